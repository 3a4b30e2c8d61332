"""The SQLite store: WAL, versioned migrations, one BEGIN IMMEDIATE per transaction.

synchronous=NORMAL in WAL mode keeps every committed transaction across a crash of
the process (kill -9); only a power loss can drop the last few, never corrupt.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.hardware.model import Inventory
from agent.protocol import DiskHints, EventKind, JobKind, JobParams, JobResult
from controller.errors import ControllerError
from controller.jobs import JobState, JobStatus, MachineState
from controller.state.migrations import MIGRATIONS
from controller.state.model import (
    BmcRecord,
    Counts,
    EventRecord,
    Image,
    InventoryRecord,
    Job,
    Machine,
    PowerState,
    Quarantine,
    Source,
    Token,
    TokenKind,
)
from controller.trust.fingerprint import Fingerprint


class StateError(ControllerError):
    """The state database cannot be used (newer schema, unreadable file)."""


def _json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _machine(row: sqlite3.Row, macs: tuple[str, ...]) -> Machine:
    inventory = Inventory.from_wire(json.loads(row["inventory"])) if row["inventory"] else None
    return Machine(
        id=row["id"],
        state=MachineState(row["state"]),
        macs=macs,
        system_uuid=row["system_uuid"],
        hostname=row["hostname"],
        desired_image=row["desired_image"],
        disk_hints=DiskHints.from_wire(json.loads(row["disk_hints"])),
        created_at=row["created_at"],
        last_seen=row["last_seen"],
        inventory=inventory,
        fingerprint=Fingerprint.from_wire(json.loads(row["fingerprint"])) if row["fingerprint"] else None,
        quarantine=Quarantine.from_wire(json.loads(row["quarantine"])) if row["quarantine"] else None,
        expected=bool(row["expected"]),
        kernel_args=row["kernel_args"],
    )


def _job(row: sqlite3.Row) -> Job:
    status = JobStatus(
        JobState(row["state"]), row["attempts"], row["max_attempts"], row["lease_deadline"], row["reason"]
    )
    result = JobResult.from_wire(json.loads(row["result"])) if row["result"] else None
    return Job(
        row["id"],
        row["machine_id"],
        JobKind(row["kind"]),
        JobParams.from_wire(json.loads(row["params"])),
        status,
        row["created_at"],
        row["updated_at"],
        result,
        row["done"],
        row["total"],
    )


def _event(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        row["id"],
        row["job_id"],
        row["machine_id"],
        row["seq"],
        row["at"],
        Source(row["source"]),
        EventKind(row["kind"]),
        row["message"],
        row["done"],
        row["total"],
    )


def _token(row: sqlite3.Row) -> Token:
    return Token(
        row["id"],
        TokenKind(row["kind"]),
        bytes(row["secret_hash"]),
        row["created_at"],
        row["machine_id"],
        row["mac"],
        row["expires_at"],
        row["used_at"],
        row["address"],
    )


def _bmc(row: sqlite3.Row) -> BmcRecord:
    return BmcRecord(
        row["machine_id"],
        row["address"],
        row["username"],
        row["sealed_password"],
        PowerState(row["power"]),
        row["power_at"],
        row["power_error"],
    )


class SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(sql, args).fetchone()
        return row

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()

    def _with_macs(self, rows: list[sqlite3.Row]) -> list[Machine]:
        out = []
        for row in rows:
            macs = self._all("SELECT mac FROM machine_macs WHERE machine_id = ? ORDER BY position", row["id"])
            out.append(_machine(row, tuple(r["mac"] for r in macs)))
        return out

    def machine(self, machine_id: str) -> Machine | None:
        found = self._with_macs(self._all("SELECT * FROM machines WHERE id = ?", machine_id))
        return found[0] if found else None

    def machine_by_mac(self, mac: str) -> Machine | None:
        row = self._one("SELECT machine_id FROM machine_macs WHERE mac = ?", mac)
        return self.machine(row["machine_id"]) if row else None

    def machine_by_uuid(self, system_uuid: str) -> Machine | None:
        found = self._with_macs(
            self._all("SELECT * FROM machines WHERE system_uuid = ? LIMIT 1", system_uuid)
        )
        return found[0] if found else None

    def machines(self) -> list[Machine]:
        return self._with_macs(self._all("SELECT * FROM machines ORDER BY id"))

    def put_machine(self, m: Machine) -> None:
        self.db.execute(
            "INSERT INTO machines (id, state, system_uuid, hostname, desired_image, disk_hints, created_at,"
            " last_seen, inventory, fingerprint, quarantine, expected, kernel_args)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " state = excluded.state, system_uuid = excluded.system_uuid, hostname = excluded.hostname,"
            " desired_image = excluded.desired_image, disk_hints = excluded.disk_hints,"
            " last_seen = excluded.last_seen, inventory = excluded.inventory,"
            " fingerprint = excluded.fingerprint, quarantine = excluded.quarantine,"
            " expected = excluded.expected, kernel_args = excluded.kernel_args",
            (
                m.id,
                m.state.value,
                m.system_uuid,
                m.hostname,
                m.desired_image,
                _json(m.disk_hints.to_wire()),
                m.created_at,
                m.last_seen,
                _json(m.inventory.to_wire()) if m.inventory else None,
                _json(m.fingerprint.to_wire()) if m.fingerprint else None,
                _json(m.quarantine.to_wire()) if m.quarantine else None,
                int(m.expected),
                m.kernel_args,
            ),
        )
        self.db.execute("DELETE FROM machine_macs WHERE machine_id = ?", (m.id,))
        self.db.executemany(
            "INSERT INTO machine_macs (mac, machine_id, position) VALUES (?, ?, ?)"
            " ON CONFLICT (mac) DO UPDATE SET machine_id = excluded.machine_id, position = excluded.position",
            [(mac, m.id, i) for i, mac in enumerate(m.macs)],
        )

    def delete_machine(self, machine_id: str) -> None:
        self.db.execute("DELETE FROM machines WHERE id = ?", (machine_id,))

    def bmc(self, machine_id: str) -> BmcRecord | None:
        row = self._one("SELECT * FROM bmcs WHERE machine_id = ?", machine_id)
        return _bmc(row) if row else None

    def bmcs(self) -> list[BmcRecord]:
        return [_bmc(r) for r in self._all("SELECT * FROM bmcs ORDER BY machine_id")]

    def put_bmc(self, b: BmcRecord) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO bmcs (machine_id, address, username, sealed_password, power, power_at,"
            " power_error) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                b.machine_id,
                b.address,
                b.username,
                b.sealed_password,
                b.power.value,
                b.power_at,
                b.power_error,
            ),
        )

    def delete_bmc(self, machine_id: str) -> None:
        self.db.execute("DELETE FROM bmcs WHERE machine_id = ?", (machine_id,))

    def add_inventory(self, record: InventoryRecord) -> None:
        self.db.execute(
            "INSERT INTO inventory (machine_id, at, data) VALUES (?, ?, ?)",
            (record.machine_id, record.at, _json(record.inventory.to_wire())),
        )

    def inventory_history(self, machine_id: str, limit: int) -> list[InventoryRecord]:
        rows = self._all(
            "SELECT * FROM inventory WHERE machine_id = ? ORDER BY id DESC LIMIT ?", machine_id, limit
        )
        return [
            InventoryRecord(r["machine_id"], r["at"], Inventory.from_wire(json.loads(r["data"])))
            for r in rows
        ]

    def put_token(self, t: Token) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO tokens (id, kind, secret_hash, created_at, machine_id, mac, expires_at,"
            " used_at, address) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                t.id,
                t.kind.value,
                t.secret_hash,
                t.created_at,
                t.machine_id,
                t.mac,
                t.expires_at,
                t.used_at,
                t.address,
            ),
        )

    def token(self, token_id: str) -> Token | None:
        row = self._one("SELECT * FROM tokens WHERE id = ?", token_id)
        return _token(row) if row else None

    def delete_tokens(self, machine_id: str, kind: TokenKind) -> None:
        self.db.execute("DELETE FROM tokens WHERE machine_id = ? AND kind = ?", (machine_id, kind.value))

    def delete_enrollment_tokens(self, mac: str, address: str) -> None:
        self.db.execute(
            "DELETE FROM tokens WHERE kind = ? AND mac = ? AND address = ?",
            (TokenKind.ENROLLMENT.value, mac, address),
        )

    def delete_expired_tokens(self, now: float) -> int:
        return self.db.execute("DELETE FROM tokens WHERE expires_at < ?", (now,)).rowcount

    def put_image(self, i: Image) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
            (i.name, i.version, i.digest, i.image_size, i.data_size, i.chunks, i.registered_at),
        )

    def image(self, name: str, version: str) -> Image | None:
        row = self._one("SELECT * FROM images WHERE name = ? AND version = ?", name, version)
        return Image(*row) if row else None

    def images(self) -> list[Image]:
        return [Image(*row) for row in self._all("SELECT * FROM images ORDER BY name, version")]

    def put_job(self, j: Job) -> None:
        s = j.status
        self.db.execute(
            "INSERT INTO jobs (id, machine_id, kind, params, state, attempts, max_attempts, lease_deadline,"
            " reason, result, done, total, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, attempts = excluded.attempts,"
            " max_attempts = excluded.max_attempts, lease_deadline = excluded.lease_deadline,"
            " reason = excluded.reason, result = excluded.result, done = excluded.done,"
            " total = excluded.total, updated_at = excluded.updated_at",
            (
                j.id,
                j.machine_id,
                j.kind.value,
                _json(j.params.to_wire()),
                s.state.value,
                s.attempts,
                s.max_attempts,
                s.lease_deadline,
                s.reason,
                _json(j.result.to_wire()) if j.result else None,
                j.done,
                j.total,
                j.created_at,
                j.updated_at,
            ),
        )

    def job(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", job_id)
        return _job(row) if row else None

    def jobs(self, machine_id: str | None, states: Sequence[JobState], limit: int) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1", []
        if machine_id is not None:
            sql, args = sql + " AND machine_id = ?", [machine_id]
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        return [_job(r) for r in self._all(sql + " ORDER BY number DESC LIMIT ?", *args, limit)]

    def next_job(self, machine_id: str) -> Job | None:
        row = self._one(
            "SELECT * FROM jobs WHERE machine_id = ? AND state IN ('running', 'queued')"
            " ORDER BY state = 'running' DESC, number LIMIT 1",
            machine_id,
        )
        return _job(row) if row else None

    def running_jobs(self) -> list[Job]:
        return [_job(r) for r in self._all("SELECT * FROM jobs WHERE state = 'running' ORDER BY number")]

    def running_deploys(self) -> list[tuple[str, str]]:
        rows = self._all(
            "SELECT machine_id, json_extract(params, '$.manifest_digest') AS digest FROM jobs"
            " WHERE state = 'running' AND kind = ?",
            JobKind.DEPLOY.value,
        )
        return [(r["machine_id"], r["digest"]) for r in rows if isinstance(r["digest"], str) and r["digest"]]

    def add_event(self, e: EventRecord) -> bool:
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO events (job_id, machine_id, seq, at, source, kind, message, done, total)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.job_id, e.machine_id, e.seq, e.at, e.source.value, e.kind.value, e.message, e.done, e.total),
        )
        return cursor.rowcount == 1

    def next_seq(self, job_id: str) -> int:
        row = self._one("SELECT COALESCE(MAX(seq), 0) + 1 AS n FROM events WHERE job_id = ?", job_id)
        return int(row["n"]) if row else 1

    def events(self, job_id: str | None, after_id: int, limit: int) -> list[EventRecord]:
        if job_id is None:
            rows = self._all("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", after_id, limit)
        else:
            rows = self._all(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                job_id,
                after_id,
                limit,
            )
        return [_event(r) for r in rows]

    def machine_events(self, machine_id: str, limit: int) -> list[EventRecord]:
        rows = self._all(
            "SELECT * FROM events WHERE machine_id = ? AND job_id IS NULL ORDER BY id DESC LIMIT ?",
            machine_id,
            limit,
        )
        return [_event(r) for r in reversed(rows)]

    def counts(self) -> Counts:
        machines = {s: 0 for s in MachineState}
        for row in self._all("SELECT state, COUNT(*) AS n FROM machines GROUP BY state"):
            machines[MachineState(row["state"])] = row["n"]
        jobs = {s: 0 for s in JobState}
        for row in self._all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            jobs[JobState(row["state"])] = row["n"]
        return Counts(machines, jobs)


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA busy_timeout = 5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state database {self.path}: {exc}") from None
        self._in_tx = False

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StateError(
                f"state database {self.path}: schema version {current}, expected at most {len(MIGRATIONS)}"
                " (written by a newer sledge)"
            )
        for number in range(current + 1, len(MIGRATIONS) + 1):
            # executescript runs the whole migration and the version bump as one transaction
            self.db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[number - 1]}; PRAGMA user_version = {number}; COMMIT;"
            )

    @contextmanager
    def transaction(self) -> Iterator[SqliteTx]:
        if self._in_tx:
            raise RuntimeError("nested transaction")
        self._in_tx = True
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield SqliteTx(self.db)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._in_tx = False

    def close(self) -> None:
        self.db.close()
