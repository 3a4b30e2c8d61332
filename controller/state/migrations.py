"""Schema migrations, applied in order; PRAGMA user_version is the number applied.

Append a new entry to change the schema; never edit one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        system_uuid TEXT NOT NULL DEFAULT '',
        hostname TEXT NOT NULL DEFAULT '',
        desired_image TEXT NOT NULL DEFAULT '',
        disk_hints TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        last_seen REAL,
        inventory TEXT
    );
    CREATE INDEX machines_uuid ON machines (system_uuid);
    CREATE TABLE machine_macs (
        mac TEXT PRIMARY KEY,
        machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
        position INTEGER NOT NULL
    );
    CREATE INDEX machine_macs_machine ON machine_macs (machine_id);
    CREATE TABLE inventory (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
        at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX inventory_machine ON inventory (machine_id, id);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        created_at REAL NOT NULL,
        machine_id TEXT REFERENCES machines (id) ON DELETE CASCADE,
        mac TEXT,
        expires_at REAL,
        used_at REAL
    );
    CREATE TABLE images (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        digest TEXT NOT NULL,
        image_size INTEGER NOT NULL,
        data_size INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        registered_at REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE jobs (
        number INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        lease_deadline REAL,
        reason TEXT NOT NULL DEFAULT '',
        result TEXT,
        done INTEGER,
        total INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_machine_state ON jobs (machine_id, state, number);
    CREATE INDEX jobs_state ON jobs (state);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        machine_id TEXT NOT NULL,
        seq INTEGER,
        at REAL NOT NULL,
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        done INTEGER,
        total INTEGER,
        UNIQUE (job_id, seq)
    );
    """,
    # 2: enrollment trust (docs/trust.md): the hardware fingerprint bound at the first
    # registration, a quarantined registration held for the operator, the operator's `expect`,
    # the address that fetched an enrollment token's boot script; and events of a machine with
    # no job (quarantine, accept), which needs events rebuilt with job_id nullable.
    """
    ALTER TABLE machines ADD COLUMN fingerprint TEXT;
    ALTER TABLE machines ADD COLUMN quarantine TEXT;
    ALTER TABLE machines ADD COLUMN expected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tokens ADD COLUMN address TEXT;
    CREATE TABLE events_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT REFERENCES jobs (id) ON DELETE CASCADE,
        machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
        seq INTEGER,
        at REAL NOT NULL,
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        done INTEGER,
        total INTEGER,
        UNIQUE (job_id, seq)
    );
    INSERT INTO events_v2 (id, job_id, machine_id, seq, at, source, kind, message, done, total)
        SELECT id, job_id, machine_id, seq, at, source, kind, message, done, total FROM events
        WHERE machine_id IN (SELECT id FROM machines);
    DROP TABLE events;
    ALTER TABLE events_v2 RENAME TO events;
    CREATE INDEX events_machine ON events (machine_id, id);
    """,
    # 3: BMC records (docs/power.md): where a machine's BMC is, the user, the password sealed
    # with the key in DATA/bmc.key (never in clear), and the power state last polled.
    """
    CREATE TABLE bmcs (
        machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        username TEXT NOT NULL,
        sealed_password TEXT NOT NULL,
        power TEXT NOT NULL DEFAULT 'unknown',
        power_at REAL,
        power_error TEXT NOT NULL DEFAULT ''
    );
    """,
    # 4: a machine's own kernel arguments for its agent boot (`sledge machine set --kernel-args`)
    """
    ALTER TABLE machines ADD COLUMN kernel_args TEXT NOT NULL DEFAULT '';
    """,
)
