"""The trust records in the store contract (both stores), and the serve flags that set the policy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.protocol import EventKind
from controller.cli import build_parser
from controller.cli.serve import config_from_args
from controller.config import from_environ
from controller.jobs import MachineState
from controller.state.memory import MemoryStore
from controller.state.model import EventRecord, Machine, Quarantine, Source, Token, TokenKind
from controller.state.sqlite import SqliteStore
from controller.state.store import Store
from controller.trust import Discovery
from controller.trust.fingerprint import fingerprint
from tests.unit.test_controller_kit import inventory

MAC = "52:54:00:00:00:01"


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = SqliteStore(tmp_path / "state.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def test_fingerprint_quarantine_and_expected_round_trip(store: Store) -> None:
    bound, seen = fingerprint(inventory()), fingerprint(inventory(uuid="other"))
    held = Quarantine(seen, inventory(uuid="other"), MachineState.DEPLOYED, 5.0, "127.0.0.2")
    m = Machine(
        "m-000000000001",
        MachineState.QUARANTINED,
        (MAC,),
        created_at=1.0,
        fingerprint=bound,
        quarantine=held,
        expected=True,
    )
    with store.transaction() as tx:
        tx.put_machine(m)
    with store.transaction() as tx:
        assert tx.machine(m.id) == m
        tx.put_machine(replace(m, quarantine=None, expected=False, state=MachineState.DEPLOYED))
    with store.transaction() as tx:
        got = tx.machine(m.id)
        assert got is not None and got.quarantine is None and not got.expected and got.fingerprint == bound


def test_a_boot_replaces_only_the_tokens_of_its_mac_and_address(store: Store) -> None:
    def token(tid: str, mac: str, address: str) -> Token:
        return Token(tid, TokenKind.ENROLLMENT, b"h" * 32, 1.0, mac=mac, expires_at=99.0, address=address)

    with store.transaction() as tx:
        tx.put_token(token("a", MAC, "127.0.0.1"))
        tx.put_token(token("b", MAC, "127.0.0.2"))
        tx.put_token(token("c", "52:54:00:00:00:02", "127.0.0.1"))
        tx.delete_enrollment_tokens(MAC, "127.0.0.1")
        assert tx.token("a") is None
        got = tx.token("b")
        assert got is not None and got.address == "127.0.0.2" and tx.token("c") is not None


def test_machine_events_have_no_job_and_go_with_the_machine(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_machine(Machine("m-000000000001", MachineState.READY, (MAC,), created_at=1.0))
        for i in range(3):
            tx.add_event(
                EventRecord(
                    0, None, "m-000000000001", None, float(i), Source.CONTROLLER, EventKind.WARNING, f"w{i}"
                )
            )
        assert [e.message for e in tx.machine_events("m-000000000001", 2)] == ["w1", "w2"]
        assert [e.job_id for e in tx.events(None, 0, 10)] == [None, None, None]
        tx.delete_machine("m-000000000001")
        assert tx.events(None, 0, 10) == []


def test_serve_flags_set_discovery_and_the_token_lifetime() -> None:
    base = from_environ({"SLEDGE_DATA": "/srv/env"}, euid=0)
    config = config_from_args(build_parser().parse_args(["serve"]), base)
    assert (config.discovery, config.enrollment_ttl) == (Discovery.OPEN, 300.0)
    args = build_parser().parse_args(["serve", "--discovery", "closed", "--enrollment-ttl", "90"])
    config = config_from_args(args, base)
    assert (config.discovery, config.enrollment_ttl) == (Discovery.CLOSED, 90.0)
    with pytest.raises(ValueError, match=r"--enrollment-ttl: expected seconds > 0, got 0\.0"):
        config_from_args(build_parser().parse_args(["serve", "--enrollment-ttl", "0"]), base)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--discovery", "ajar"])
