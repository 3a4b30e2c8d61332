"""The store interface: every change happens inside one transaction.

`Store.transaction()` yields a `Tx` whose reads see the transaction's own writes;
leaving the block commits, an exception rolls everything back. Implementations:
state.sqlite.SqliteStore (WAL, migrations) and state.memory.MemoryStore (tests).
The store holds records; deciding what changes is the fleet services' job (controller.fleet).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from controller.jobs import JobState
from controller.state.model import (
    BmcRecord,
    Counts,
    EventRecord,
    Image,
    InventoryRecord,
    Job,
    Machine,
    Token,
    TokenKind,
)


class Tx(Protocol):
    def machine(self, machine_id: str) -> Machine | None: ...
    def machine_by_mac(self, mac: str) -> Machine | None: ...
    def machine_by_uuid(self, system_uuid: str) -> Machine | None: ...
    def machines(self) -> list[Machine]: ...
    def put_machine(self, machine: Machine) -> None: ...
    def delete_machine(self, machine_id: str) -> None:
        """Removes the machine with its MACs, inventory, tokens, jobs and events."""

    def bmc(self, machine_id: str) -> BmcRecord | None: ...
    def bmcs(self) -> list[BmcRecord]: ...
    def put_bmc(self, bmc: BmcRecord) -> None: ...
    def delete_bmc(self, machine_id: str) -> None: ...

    def add_inventory(self, record: InventoryRecord) -> None: ...
    def inventory_history(self, machine_id: str, limit: int) -> list[InventoryRecord]: ...

    def put_token(self, token: Token) -> None: ...
    def token(self, token_id: str) -> Token | None: ...
    def delete_tokens(self, machine_id: str, kind: TokenKind) -> None: ...
    def delete_enrollment_tokens(self, mac: str, address: str) -> None:
        """A new boot from the same address replaces the MAC's earlier enrollment tokens from it."""

    def delete_expired_tokens(self, now: float) -> int: ...

    def put_image(self, image: Image) -> None: ...
    def image(self, name: str, version: str) -> Image | None: ...
    def images(self) -> list[Image]: ...

    def put_job(self, job: Job) -> None: ...
    def job(self, job_id: str) -> Job | None: ...
    def jobs(self, machine_id: str | None, states: Sequence[JobState], limit: int) -> list[Job]:
        """Newest first; empty `states` means any."""

    def next_job(self, machine_id: str) -> Job | None:
        """The machine's running job, else its oldest queued one."""

    def running_jobs(self) -> list[Job]: ...

    def running_deploys(self) -> list[tuple[str, str]]:
        """(machine id, manifest digest) of every running deploy job: the tracker's expected swarms,
        read without decoding whole jobs (10,000 of them took ~200 ms as Jobs, on the event loop)."""

    def add_event(self, event: EventRecord) -> bool:
        """Insert (event.id is ignored); False if (job_id, seq) is already there."""

    def next_seq(self, job_id: str) -> int: ...
    def events(self, job_id: str | None, after_id: int, limit: int) -> list[EventRecord]:
        """In id order (the order they were recorded)."""

    def machine_events(self, machine_id: str, limit: int) -> list[EventRecord]:
        """The machine's own events (no job: quarantine, accept), the last `limit` in id order."""

    def counts(self) -> Counts: ...


class Store(Protocol):
    def transaction(self) -> AbstractContextManager[Tx]: ...
    def close(self) -> None: ...
