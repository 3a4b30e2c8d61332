"""The store contract, run against both stores: SQLite (a real file) and memory."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.protocol import EventKind, JobKind, JobParams
from controller.jobs import JobState, JobStatus, MachineState
from controller.state.memory import MemoryStore
from controller.state.migrations import MIGRATIONS
from controller.state.model import EventRecord, InventoryRecord, Job, Machine, Source, Token, TokenKind
from controller.state.sqlite import SqliteStore, StateError
from controller.state.store import Store
from tests.unit.test_controller_kit import inventory


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = SqliteStore(tmp_path / "state.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def machine(mid: str = "m-000000000001", *macs: str) -> Machine:
    return Machine(
        mid, MachineState.READY, macs or ("52:54:00:00:00:01",), system_uuid=f"uuid-{mid}", created_at=1.0
    )


def job(jid: str, mid: str = "m-000000000001", state: JobState = JobState.QUEUED) -> Job:
    return Job(jid, mid, JobKind.INVENTORY, JobParams(), JobStatus(state), 1.0, 1.0)


def ev(jid: str, seq: int | None, message: str = "") -> EventRecord:
    return EventRecord(0, jid, "m-000000000001", seq, 1.0, Source.AGENT, EventKind.LOG, message)


def test_machines_by_id_mac_and_uuid(store: Store) -> None:
    m = replace(machine(), inventory=inventory(), hostname="node1")
    with store.transaction() as tx:
        tx.put_machine(m)
    with store.transaction() as tx:
        assert tx.machine(m.id) == m
        assert tx.machine_by_mac("52:54:00:00:00:01") == m
        assert tx.machine_by_uuid(m.system_uuid) == m
        assert tx.machine_by_mac("52:54:00:00:00:99") is None


def test_a_mac_moves_to_the_machine_that_claims_it(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_machine(machine("m-000000000001", "52:54:00:00:00:01", "52:54:00:00:00:02"))
        tx.put_machine(machine("m-000000000002", "52:54:00:00:00:02"))
    with store.transaction() as tx:
        found = tx.machine_by_mac("52:54:00:00:00:02")
        assert found is not None and found.id == "m-000000000002"
        first = tx.machine("m-000000000001")
        assert first is not None and first.macs == ("52:54:00:00:00:01",)


def test_a_failed_transaction_changes_nothing(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_machine(machine())
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.put_job(job("j-000000000001"))
        tx.add_event(ev("j-000000000001", 1))
        tx.delete_machine("m-000000000001")
        raise RuntimeError("boom")
    with store.transaction() as tx:
        assert tx.machine("m-000000000001") is not None
        assert tx.job("j-000000000001") is None
        assert tx.events(None, 0, 10) == []


def test_events_are_idempotent_by_job_and_seq_and_ordered(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_machine(machine())
        tx.put_job(job("j-000000000001"))
        assert tx.next_seq("j-000000000001") == 1
        assert tx.add_event(ev("j-000000000001", 1, "a"))
        assert not tx.add_event(ev("j-000000000001", 1, "again"))
        assert tx.add_event(ev("j-000000000001", None, "controller"))
        assert tx.add_event(ev("j-000000000001", None, "controller"))  # no seq: never deduplicated
        assert tx.add_event(ev("j-000000000001", 2, "b"))
        assert tx.next_seq("j-000000000001") == 3
        found = tx.events("j-000000000001", 0, 10)
    assert [(e.seq, e.message) for e in found] == [
        (1, "a"),
        (None, "controller"),
        (None, "controller"),
        (2, "b"),
    ]
    assert [e.id for e in found] == sorted(e.id for e in found)
    with store.transaction() as tx:
        assert [e.seq for e in tx.events(None, found[1].id, 10)] == [None, 2]


def test_next_job_prefers_running_then_oldest_queued(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_machine(machine())
        tx.put_machine(machine("m-000000000002", "52:54:00:00:00:02"))
        tx.put_job(job("j-000000000001", "m-000000000002"))
        tx.put_job(job("j-000000000002"))
        tx.put_job(job("j-000000000003"))
        tx.put_job(job("j-000000000004", state=JobState.SUCCEEDED))
    with store.transaction() as tx:
        nxt = tx.next_job("m-000000000001")
        assert nxt is not None and nxt.id == "j-000000000002"
        tx.put_job(job("j-000000000003", state=JobState.RUNNING))
        nxt = tx.next_job("m-000000000001")
        assert nxt is not None and nxt.id == "j-000000000003"
        assert [j.id for j in tx.jobs("m-000000000001", (), 10)] == [
            "j-000000000004",
            "j-000000000003",
            "j-000000000002",
        ]
        assert [j.id for j in tx.jobs(None, (JobState.QUEUED,), 10)] == ["j-000000000002", "j-000000000001"]
        assert tx.counts().jobs[JobState.QUEUED] == 2


def test_running_deploys_are_machine_and_digest_of_running_deploy_jobs_only(store: Store) -> None:
    a, b = "ab" * 32, "cd" * 32

    def deploy(jid: str, mid: str, digest: str, state: JobState, kind: JobKind = JobKind.DEPLOY) -> Job:
        return Job(jid, mid, kind, JobParams(manifest_digest=digest), JobStatus(state), 1.0, 1.0)

    with store.transaction() as tx:
        for i in range(1, 5):
            tx.put_machine(machine(f"m-00000000000{i}", f"52:54:00:00:00:0{i}"))
        tx.put_job(deploy("j-000000000001", "m-000000000001", a, JobState.RUNNING))
        tx.put_job(deploy("j-000000000002", "m-000000000002", b, JobState.RUNNING))
        tx.put_job(deploy("j-000000000003", "m-000000000003", a, JobState.QUEUED))  # not yet running
        tx.put_job(deploy("j-000000000004", "m-000000000004", a, JobState.SUCCEEDED))  # over
        tx.put_job(deploy("j-000000000005", "m-000000000004", a, JobState.RUNNING, JobKind.VERIFY))
        tx.put_job(job("j-000000000006", "m-000000000003", JobState.RUNNING))  # inventory: no image
    with store.transaction() as tx:
        assert sorted(tx.running_deploys()) == [("m-000000000001", a), ("m-000000000002", b)]
        expected = sorted(
            (j.machine_id, j.params.manifest_digest) for j in tx.running_jobs() if j.kind is JobKind.DEPLOY
        )
        assert sorted(tx.running_deploys()) == expected, "what decoding the whole jobs finds"


def test_deleting_a_machine_takes_its_jobs_events_tokens_and_inventory(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_machine(machine())
        tx.put_job(job("j-000000000001"))
        tx.add_event(ev("j-000000000001", 1))
        tx.add_inventory(InventoryRecord("m-000000000001", 1.0, inventory()))
        tx.put_token(Token("t1", TokenKind.AGENT, b"h" * 32, 1.0, machine_id="m-000000000001"))
    with store.transaction() as tx:
        tx.delete_machine("m-000000000001")
    with store.transaction() as tx:
        assert tx.machines() == [] and tx.job("j-000000000001") is None and tx.token("t1") is None
        assert tx.events(None, 0, 10) == [] and tx.inventory_history("m-000000000001", 10) == []


def test_tokens_expire(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_token(
            Token("old", TokenKind.ENROLLMENT, b"h" * 32, 1.0, mac="52:54:00:00:00:01", expires_at=5.0)
        )
        tx.put_token(
            Token("new", TokenKind.ENROLLMENT, b"h" * 32, 1.0, mac="52:54:00:00:00:01", expires_at=50.0)
        )
        assert tx.delete_expired_tokens(10.0) == 1
        assert tx.token("old") is None and tx.token("new") is not None


def test_sqlite_survives_reopen_and_records_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    with s.transaction() as tx:
        tx.put_machine(replace(machine(), inventory=inventory()))
        tx.add_inventory(InventoryRecord("m-000000000001", 2.0, inventory(hostname="h2")))
    s.close()
    s = SqliteStore(path)
    assert s.schema_version == len(MIGRATIONS)
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with s.transaction() as tx:
        assert tx.machine("m-000000000001") is not None
        assert tx.inventory_history("m-000000000001", 5)[0].inventory.system.hostname == "h2"
    s.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(
        StateError, match=f"schema version {len(MIGRATIONS) + 1}, expected at most {len(MIGRATIONS)}"
    ):
        SqliteStore(path)
