"""An in-memory store for unit tests: the same contract as SQLite, rollback by snapshot."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from agent.protocol import JobKind
from controller.jobs import JobState, MachineState
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


@dataclass
class _Tables:
    machines: dict[str, Machine] = field(default_factory=dict)
    inventory: list[InventoryRecord] = field(default_factory=list)
    tokens: dict[str, Token] = field(default_factory=dict)
    images: dict[tuple[str, str], Image] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    job_order: list[str] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    seqs: set[tuple[str, int]] = field(default_factory=set)
    bmcs: dict[str, BmcRecord] = field(default_factory=dict)


class MemoryTx:
    def __init__(self, t: _Tables) -> None:
        self.t = t

    def machine(self, machine_id: str) -> Machine | None:
        return self.t.machines.get(machine_id)

    def machine_by_mac(self, mac: str) -> Machine | None:
        return next((m for m in self.t.machines.values() if mac in m.macs), None)

    def machine_by_uuid(self, system_uuid: str) -> Machine | None:
        return next((m for m in self.t.machines.values() if m.system_uuid == system_uuid), None)

    def machines(self) -> list[Machine]:
        return sorted(self.t.machines.values(), key=lambda m: m.id)

    def put_machine(self, machine: Machine) -> None:
        for other in self.t.machines.values():
            if other.id != machine.id and set(other.macs) & set(machine.macs):
                self.t.machines[other.id] = replace(
                    other, macs=tuple(x for x in other.macs if x not in machine.macs)
                )
        self.t.machines[machine.id] = machine

    def delete_machine(self, machine_id: str) -> None:
        self.t.machines.pop(machine_id, None)
        self.t.bmcs.pop(machine_id, None)
        self.t.inventory = [r for r in self.t.inventory if r.machine_id != machine_id]
        self.t.tokens = {k: v for k, v in self.t.tokens.items() if v.machine_id != machine_id}
        gone = {j.id for j in self.t.jobs.values() if j.machine_id == machine_id}
        self.t.jobs = {k: v for k, v in self.t.jobs.items() if k not in gone}
        self.t.job_order = [k for k in self.t.job_order if k not in gone]
        self.t.events = [e for e in self.t.events if e.job_id not in gone and e.machine_id != machine_id]
        self.t.seqs = {s for s in self.t.seqs if s[0] not in gone}

    def bmc(self, machine_id: str) -> BmcRecord | None:
        return self.t.bmcs.get(machine_id)

    def bmcs(self) -> list[BmcRecord]:
        return [self.t.bmcs[k] for k in sorted(self.t.bmcs)]

    def put_bmc(self, bmc: BmcRecord) -> None:
        if bmc.machine_id not in self.t.machines:  # as SQLite's foreign key would
            raise KeyError(f"BMC record for machine {bmc.machine_id}: no such machine")
        self.t.bmcs[bmc.machine_id] = bmc

    def delete_bmc(self, machine_id: str) -> None:
        self.t.bmcs.pop(machine_id, None)

    def add_inventory(self, record: InventoryRecord) -> None:
        self.t.inventory.append(record)

    def inventory_history(self, machine_id: str, limit: int) -> list[InventoryRecord]:
        return [r for r in reversed(self.t.inventory) if r.machine_id == machine_id][:limit]

    def put_token(self, token: Token) -> None:
        self.t.tokens[token.id] = token

    def token(self, token_id: str) -> Token | None:
        return self.t.tokens.get(token_id)

    def delete_tokens(self, machine_id: str, kind: TokenKind) -> None:
        self.t.tokens = {
            k: v for k, v in self.t.tokens.items() if not (v.machine_id == machine_id and v.kind is kind)
        }

    def delete_enrollment_tokens(self, mac: str, address: str) -> None:
        self.t.tokens = {
            k: v
            for k, v in self.t.tokens.items()
            if not (v.kind is TokenKind.ENROLLMENT and v.mac == mac and v.address == address)
        }

    def delete_expired_tokens(self, now: float) -> int:
        before = len(self.t.tokens)
        self.t.tokens = {
            k: v for k, v in self.t.tokens.items() if v.expires_at is None or v.expires_at >= now
        }
        return before - len(self.t.tokens)

    def put_image(self, image: Image) -> None:
        self.t.images[(image.name, image.version)] = image

    def image(self, name: str, version: str) -> Image | None:
        return self.t.images.get((name, version))

    def images(self) -> list[Image]:
        return [self.t.images[k] for k in sorted(self.t.images)]

    def put_job(self, job: Job) -> None:
        if job.id not in self.t.jobs:
            self.t.job_order.append(job.id)
        self.t.jobs[job.id] = job

    def job(self, job_id: str) -> Job | None:
        return self.t.jobs.get(job_id)

    def jobs(self, machine_id: str | None, states: Sequence[JobState], limit: int) -> list[Job]:
        out = [self.t.jobs[k] for k in reversed(self.t.job_order)]
        out = [j for j in out if (machine_id is None or j.machine_id == machine_id)]
        return [j for j in out if not states or j.state in states][:limit]

    def next_job(self, machine_id: str) -> Job | None:
        mine = [self.t.jobs[k] for k in self.t.job_order if self.t.jobs[k].machine_id == machine_id]
        running = [j for j in mine if j.state is JobState.RUNNING]
        queued = [j for j in mine if j.state is JobState.QUEUED]
        found = running or queued
        return found[0] if found else None

    def running_jobs(self) -> list[Job]:
        return [self.t.jobs[k] for k in self.t.job_order if self.t.jobs[k].state is JobState.RUNNING]

    def running_deploys(self) -> list[tuple[str, str]]:
        return [
            (j.machine_id, j.params.manifest_digest)
            for j in self.running_jobs()
            if j.kind is JobKind.DEPLOY and j.params.manifest_digest
        ]

    def add_event(self, event: EventRecord) -> bool:
        if event.seq is not None:
            if (event.job_id or "", event.seq) in self.t.seqs:
                return False
            self.t.seqs.add((event.job_id or "", event.seq))
        self.t.events.append(replace(event, id=len(self.t.events) + 1))
        return True

    def next_seq(self, job_id: str) -> int:
        return max((s for j, s in self.t.seqs if j == job_id), default=0) + 1

    def events(self, job_id: str | None, after_id: int, limit: int) -> list[EventRecord]:
        out = [e for e in self.t.events if e.id > after_id and (job_id is None or e.job_id == job_id)]
        return out[:limit]

    def machine_events(self, machine_id: str, limit: int) -> list[EventRecord]:
        mine = [e for e in self.t.events if e.machine_id == machine_id and e.job_id is None]
        return mine[-limit:] if limit else []

    def counts(self) -> Counts:
        machines = {s: 0 for s in MachineState}
        for m in self.t.machines.values():
            machines[m.state] += 1
        jobs = {s: 0 for s in JobState}
        for j in self.t.jobs.values():
            jobs[j.state] += 1
        return Counts(machines, jobs)


class MemoryStore:
    def __init__(self) -> None:
        self._tables = _Tables()

    @contextmanager
    def transaction(self) -> Iterator[MemoryTx]:
        snapshot = copy.deepcopy(self._tables)
        try:
            yield MemoryTx(self._tables)
        except BaseException:
            self._tables = snapshot
            raise

    def close(self) -> None:
        pass
