"""Migration 2 upgrades a database written by the first schema: rows, event ids and the sequence
kept; the first registration after it binds the fingerprint from the machine's last inventory."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from agent.protocol import EventKind, JobKind, JobParams, RegisterRequest
from controller.fleet.agents import Policy, machine_event
from controller.fleet.enrollment import Enrollment
from controller.fleet.operators import Operations
from controller.jobs import MachineState
from controller.state.migrations import MIGRATIONS
from controller.state.sqlite import SqliteStore
from controller.trust.limits import FailureLimiter, Limit
from tests.unit.test_controller_kit import Clock, inventory
from tests.unit.test_trust import disk, with_disks

MAC = "52:54:00:00:00:01"


def first_schema_database(path: Path) -> None:
    """What sledge before migration 2 left: a deployed machine, a job with events, a boot token."""
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    inv = with_disks(inventory(macs=(MAC,)), disk("sda", "S1"))
    db.execute(
        "INSERT INTO machines (id, state, system_uuid, hostname, created_at, last_seen, inventory)"
        " VALUES ('m-000000000001', 'deployed', ?, 'node1', 1.0, 2.0, ?)",
        (inv.system.uuid, json.dumps(inv.to_wire())),
    )
    db.execute("INSERT INTO machine_macs VALUES (?, 'm-000000000001', 0)", (MAC,))
    db.execute(
        "INSERT INTO jobs (id, machine_id, kind, params, state, attempts, max_attempts, created_at,"
        " updated_at)"
        " VALUES ('j-000000000001', 'm-000000000001', 'inventory', '{}', 'succeeded', 1, 3, 1.0, 2.0)"
    )
    for i in (1, 2, 7):
        db.execute(
            "INSERT INTO events (id, job_id, machine_id, seq, at, source, kind, message)"
            " VALUES (?, 'j-000000000001', 'm-000000000001', ?, 1.0, 'agent', 'log', ?)",
            (i, i, f"e{i}"),
        )
    db.execute(
        "INSERT INTO tokens (id, kind, secret_hash, created_at, mac, expires_at)"
        " VALUES ('0000000000000001', 'enrollment', x'00', 1.0, ?, 99.0)",
        (MAC,),
    )
    db.commit()
    db.close()


def test_an_existing_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first_schema_database(path)
    store = SqliteStore(path)
    assert store.schema_version == len(MIGRATIONS) == 4
    with store.transaction() as tx:
        machine = tx.machine("m-000000000001")
        assert machine is not None and machine.state is MachineState.DEPLOYED and machine.macs == (MAC,)
        assert machine.fingerprint is None and machine.quarantine is None and not machine.expected
        assert machine.kernel_args == ""  # migration 4: none until an operator sets them
        assert [(e.id, e.message) for e in tx.events("j-000000000001", 0, 10)] == [
            (1, "e1"),
            (2, "e2"),
            (7, "e7"),
        ]
        token = tx.token("0000000000000001")
        assert token is not None and token.address is None and token.mac == MAC
        assert tx.bmc("m-000000000001") is None and tx.bmcs() == []  # migration 3: no BMC until set
    with store.transaction() as tx:
        machine_event(tx, "m-000000000001", 3.0, EventKind.LOG, "after")
        assert [e.id for e in tx.events(None, 0, 10)] == [1, 2, 7, 8]  # ids go on from the old table's
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
    store.close()


def test_the_first_registration_after_the_upgrade_binds_from_the_last_inventory(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first_schema_database(path)
    store = SqliteStore(path)
    clock = Clock(10.0)
    enrollment = Enrollment(
        store, Policy(), FailureLimiter({"mac": Limit(5, 60), "address": Limit(5, 60)}, clock), clock=clock
    )

    def boot_and_register(disk_serial: str) -> MachineState:
        token = enrollment.boot(MAC, "127.0.0.1").enrollment_token
        if token is None:  # deployed with nothing queued: give it work so it boots the agent
            Operations(store, clock=clock).create_job(MAC, JobKind.INVENTORY, JobParams())
            token = enrollment.boot(MAC, "127.0.0.1").enrollment_token
        assert token is not None
        inv = with_disks(inventory(macs=(MAC,)), disk("sda", disk_serial))
        enrollment.register(RegisterRequest(token, inv), "127.0.0.1")
        with store.transaction() as tx:
            machine = tx.machine("m-000000000001")
        assert machine is not None
        return machine.state

    assert boot_and_register("S1") is MachineState.DEPLOYED  # same hardware as its stored inventory
    assert boot_and_register("S2") is MachineState.QUARANTINED
    store.close()
