"""Fleet operations for enrolled agents: each method is one store transaction.

controller.jobs decides, the store records; a method that fails changes nothing. Boot and
registration are in fleet.enrollment, operator operations in fleet.operators. A quarantined
machine's agent is authenticated but given no job, and may not post events or inventory.
`notify(machine_id)` is called after every commit that could wake a long-poll or an event stream.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.hardware.model import Inventory
from agent.protocol import (
    Assignment,
    EventAck,
    EventBatch,
    EventKind,
    FinishRequest,
    Heartbeat,
    HeartbeatReply,
    JobKind,
    identity,
)
from controller import auth, jobs
from controller.fleet.errors import Conflict, Denied, Invalid, NotFound
from controller.fleet.tracker import Shun
from controller.jobs import JobState
from controller.state.model import EventRecord, InventoryRecord, Job, Machine, Source
from controller.state.store import Store, Tx
from controller.trust import Discovery


@dataclass(frozen=True)
class Policy:
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 30.0
    enrollment_ttl: float = 300.0
    max_attempts: int = jobs.DEFAULT_MAX_ATTEMPTS
    sources: tuple[str, ...] = ()
    discovery: Discovery = Discovery.OPEN


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def controller_event(tx: Tx, job: Job, now: float, kind: EventKind, message: str) -> None:
    tx.add_event(EventRecord(0, job.id, job.machine_id, None, now, Source.CONTROLLER, kind, message))


def machine_event(tx: Tx, machine_id: str, now: float, kind: EventKind, message: str) -> None:
    """An event of the machine itself, outside any job (quarantine, accept)."""
    tx.add_event(EventRecord(0, None, machine_id, None, now, Source.CONTROLLER, kind, message))


def quarantined(machine: Machine) -> str:
    return (
        f"{machine.label}: quarantined (its hardware differs from the bound fingerprint); expected an"
        f" operator's `sledge machine accept` first"
    )


def end_job(tx: Tx, job: Job, status: jobs.JobStatus, now: float, message: str) -> Job:
    """Record a job's move out of running/queued and the machine's matching state."""
    ended = replace(job, status=status, updated_at=now)
    tx.put_job(ended)
    machine = tx.machine(job.machine_id)
    if machine is not None and machine.quarantine is not None:  # it returns there when accepted
        state = jobs.machine_on_end(machine.quarantine.previous_state, job.kind, status.state)
        tx.put_machine(replace(machine, quarantine=replace(machine.quarantine, previous_state=state)))
    elif machine is not None:
        state = jobs.machine_on_end(machine.state, job.kind, status.state)
        tx.put_machine(replace(machine, state=state))
    kind = EventKind.ERROR if status.state is JobState.FAILED else EventKind.STAGE
    controller_event(tx, ended, now, kind, message)
    return ended


class Fleet:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        clock: Callable[[], float] = time.time,
        notify: Callable[[str], None] = lambda machine_id: None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.notify = notify

    @staticmethod
    def _parse(text: str, prefix: str, what: str) -> tuple[str, str]:
        try:
            return auth.parse_token(text, prefix, what)
        except auth.AuthError as exc:
            raise Denied(str(exc)) from None

    def authenticate_agent(self, text: str | None) -> str:
        """An agent token -> the id of the one machine it speaks for."""
        if text is None:
            raise Denied("agent token: expected 'Authorization: Bearer <token>' from registration")
        token_id, secret = self._parse(text, auth.AGENT_PREFIX, "agent token")
        with self.store.transaction() as tx:
            token = tx.token(token_id)
        if token is None or token.machine_id is None or not auth.secret_matches(secret, token.secret_hash):
            raise Denied("agent token: unknown or revoked (register again)")
        return token.machine_id

    def update_inventory(self, machine_id: str, inventory: Inventory) -> None:
        """A fresh inventory from the agent (an inventory job, or a change it noticed)."""
        now = self.clock()
        uuid, macs = identity(inventory)
        with self.store.transaction() as tx:
            machine = tx.machine(machine_id)
            if machine is None:
                raise NotFound(f"machine {machine_id}: deleted; register again")
            if machine.quarantine is not None:
                raise Conflict(quarantined(machine))
            if machine.system_uuid and uuid and uuid != machine.system_uuid:
                raise Conflict(
                    f"{machine.label}: inventory.system.uuid is {uuid}, expected {machine.system_uuid}"
                )
            hostname = inventory.system.hostname or machine.hostname
            tx.put_machine(replace(machine, inventory=inventory, macs=macs, hostname=hostname, last_seen=now))
            tx.add_inventory(InventoryRecord(machine.id, now, inventory))

    # -- agent work ----------------------------------------------------------------------------------

    def _own_job(self, tx: Tx, machine_id: str, job_id: str) -> Job:
        machine = tx.machine(machine_id)
        if machine is not None and machine.quarantine is not None:
            raise Conflict(quarantined(machine))
        job = tx.job(job_id)
        if job is None or job.machine_id != machine_id:
            raise NotFound(f"job {job_id}: no such job for machine {machine_id}")
        return job

    def heartbeat(self, machine_id: str, beat: Heartbeat) -> HeartbeatReply:
        now = self.clock()
        with self.store.transaction() as tx:
            machine = tx.machine(machine_id)
            if machine is None:
                raise NotFound(f"machine {machine_id}: deleted; register again")
            tx.put_machine(replace(machine, last_seen=now))
            if beat.job_id is None:
                return HeartbeatReply()
            if machine.quarantine is not None:
                return HeartbeatReply(cancel=(beat.job_id,))  # stop: this agent is not trusted yet
            job = self._own_job(tx, machine_id, beat.job_id)
            if job.state is not JobState.RUNNING:
                return HeartbeatReply(cancel=(job.id,))
            status = jobs.renew(job.id, job.status, job.status.attempts, now, self.policy.lease_seconds)
            tx.put_job(replace(job, status=status, updated_at=now))
            return HeartbeatReply()

    def check_deploying(self, machine_id: str, job_id: str, digest: str, chunks: int | None = None) -> None:
        """Only an agent running a deploy job of an image may take part in sharing its chunks, and
        its bitmap must be one of that image's chunk count (a peer claiming chunks the image does not
        have would be handed to others as a holder of them)."""
        with self.store.transaction() as tx:
            job = self._own_job(tx, machine_id, job_id)
            image = tx.image(job.params.image_name, job.params.image_version)
        if job.kind is not JobKind.DEPLOY or job.state is not JobState.RUNNING:
            raise Conflict(f"job {job_id}: expected a running deploy job, got a {job.state} {job.kind} job")
        if job.params.manifest_digest != digest:
            raise Conflict(
                f"job {job_id}: deploys manifest {job.params.manifest_digest[:16]}, not {digest[:16]}"
            )
        if chunks is not None and image is not None and image.digest == digest and chunks != image.chunks:
            raise Invalid(
                f"job {job_id}: announced a bitmap of {chunks} chunks, expected {image.chunks} "
                f"(image {image.ref})"
            )

    def shunned(self, shun: Shun) -> None:
        """The tracker removed a machine from an image's swarm: say so in the machine's events."""
        with self.store.transaction() as tx:
            if tx.machine(shun.machine_id) is None:
                return
            machine_event(
                tx,
                shun.machine_id,
                self.clock(),
                EventKind.WARNING,
                f"removed from the peer swarm of manifest {shun.digest[:16]}: {len(shun.reporters)} agents"
                f" ({', '.join(shun.reporters)}) got chunks from it ({shun.url}) that failed verification;"
                " expected bytes that match the manifest (a bad disk, bad memory or a hostile agent);"
                " its deploy goes on from its own sources",
            )
        self.notify(shun.machine_id)

    def deploying(self) -> dict[str, frozenset[str]]:
        """Manifest digest -> the machines running a deploy job of it: the swarms the tracker should
        expect, whose agents may not have announced yet (controller.fleet.tracker)."""
        with self.store.transaction() as tx:
            running = tx.running_deploys()
        found: dict[str, set[str]] = {}
        for machine_id, digest in running:
            found.setdefault(digest, set()).add(machine_id)
        return {digest: frozenset(machines) for digest, machines in found.items()}

    def claim(self, machine_id: str) -> Assignment | None:
        """The machine's running job (handed again, e.g. to a restarted agent) or its oldest queued one."""
        now = self.clock()
        with self.store.transaction() as tx:
            machine = tx.machine(machine_id)
            if machine is None:
                raise NotFound(f"machine {machine_id}: deleted; register again")
            job = tx.next_job(machine_id)
            if job is None or machine.quarantine is not None:
                return None  # a quarantined machine's agent waits: jobs and their secrets stay here
            status = jobs.claim(job.id, job.status, now, self.policy.lease_seconds)
            first = job.state is JobState.QUEUED
            job = replace(job, status=status, updated_at=now)
            tx.put_job(job)
            tx.put_machine(
                replace(machine, state=jobs.machine_on_start(machine.state, job.kind), last_seen=now)
            )
            if first:
                controller_event(tx, job, now, EventKind.STAGE, f"started: attempt {status.attempts}")
            next_seq = tx.next_seq(job.id)
        self.notify(machine_id)
        return Assignment(
            job.id,
            job.kind,
            status.attempts,
            next_seq,
            self.policy.lease_seconds,
            job.params,
            self.policy.sources,
        )

    def post_events(self, machine_id: str, job_id: str, batch: EventBatch) -> EventAck:
        """Append events in seq order; ones already recorded are skipped, a gap is refused."""
        now = self.clock()
        with self.store.transaction() as tx:
            job = self._own_job(tx, machine_id, job_id)
            expected = tx.next_seq(job.id)
            if (
                job.state.terminal
                and batch.attempt == job.status.attempts
                and all(e.seq < expected for e in batch.events)
            ):
                return EventAck(expected)  # a retry of events already recorded before the job ended
            try:
                status = jobs.renew(job.id, job.status, batch.attempt, now, self.policy.lease_seconds)
            except jobs.TransitionError as exc:
                raise Conflict(str(exc)) from None
            if batch.events and batch.events[0].seq > expected:
                raise Conflict(
                    f"job {job_id}: events[0].seq is {batch.events[0].seq}, expected at most {expected}"
                )
            done, total = job.done, job.total
            for event in batch.events:
                if event.seq < expected:
                    continue  # already recorded: a retried post
                record = EventRecord(
                    0,
                    job.id,
                    machine_id,
                    event.seq,
                    event.at,
                    Source.AGENT,
                    event.kind,
                    event.message,
                    event.done,
                    event.total,
                )
                tx.add_event(record)
                done = event.done if event.done is not None else done
                total = event.total if event.total is not None else total
                expected = event.seq + 1
            tx.put_job(replace(job, status=status, done=done, total=total, updated_at=now))
        self.notify(machine_id)
        return EventAck(expected)

    def finish(self, machine_id: str, job_id: str, request: FinishRequest) -> Job:
        now = self.clock()
        with self.store.transaction() as tx:
            job = self._own_job(tx, machine_id, job_id)
            if job.state.terminal and job.status.attempts == request.attempt and job.result == request.result:
                return job  # a retried finish
            try:
                status = jobs.finish(
                    job.id, job.status, request.attempt, request.result.outcome, request.result.message
                )
            except jobs.TransitionError as exc:
                raise Conflict(str(exc)) from None
            message = f"{status.state}" + (f": {request.result.message}" if request.result.message else "")
            job = end_job(tx, replace(job, result=request.result), status, now, message)
        self.notify(machine_id)
        return job

    # -- background ----------------------------------------------------------------------------------

    def reap(self) -> list[Job]:
        """Fail or re-queue every running job whose lease ran out; returns the changed jobs."""
        now = self.clock()
        changed = []
        with self.store.transaction() as tx:
            for job in tx.running_jobs():
                if jobs.lease_expired(job.status, now):
                    status = jobs.expire(job.kind, job.status, now)
                    changed.append(end_job(tx, job, status, now, status.reason))
        for job in changed:
            self.notify(job.machine_id)
        return changed

    def grant_grace(self) -> int:
        """On start: give every running job a full lease, since the controller, not the agent, was away."""
        now = self.clock()
        with self.store.transaction() as tx:
            running = tx.running_jobs()
            for job in running:
                status = replace(
                    job.status,
                    lease_deadline=max(job.status.lease_deadline or 0, now + self.policy.lease_seconds),
                )
                tx.put_job(replace(job, status=status))
        return len(running)
