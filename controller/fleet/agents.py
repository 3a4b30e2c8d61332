"""Fleet operations for boot and agents: each method is one store transaction.

controller.jobs decides, the store records; a method that fails changes nothing.
Operator operations are in fleet.operators. `notify(machine_id)` is called after
every commit that could wake a long-poll or an event stream.
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
    RegisterReply,
    RegisterRequest,
    identity,
)
from controller import auth, jobs
from controller.fleet.errors import Conflict, Denied, NotFound
from controller.jobs import JobState, MachineState
from controller.state.model import EventRecord, InventoryRecord, Job, Machine, Source, Token, TokenKind
from controller.state.store import Store, Tx


@dataclass(frozen=True)
class Policy:
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 30.0
    enrollment_ttl: float = 600.0
    max_attempts: int = jobs.DEFAULT_MAX_ATTEMPTS
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class BootDecision:
    machine_id: str
    from_disk: bool
    enrollment_token: str | None


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def controller_event(tx: Tx, job: Job, now: float, kind: EventKind, message: str) -> None:
    tx.add_event(EventRecord(0, job.id, job.machine_id, None, now, Source.CONTROLLER, kind, message))


def end_job(tx: Tx, job: Job, status: jobs.JobStatus, now: float, message: str) -> Job:
    """Record a job's move out of running/queued and the machine's matching state."""
    ended = replace(job, status=status, updated_at=now)
    tx.put_job(ended)
    machine = tx.machine(job.machine_id)
    if machine is not None:
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

    # -- boot and enrollment ---------------------------------------------------------------------

    def boot(self, mac: str) -> BootDecision:
        """The iPXE decision for a MAC; a machine never seen becomes `discovered`."""
        now = self.clock()
        with self.store.transaction() as tx:
            machine = tx.machine_by_mac(mac)
            if machine is None:
                machine = Machine(new_id("m"), MachineState.DISCOVERED, (mac,), created_at=now)
            machine = replace(machine, last_seen=now)
            tx.put_machine(machine)
            tx.delete_expired_tokens(now)
            if jobs.boots_from_disk(machine.state, tx.next_job(machine.id) is not None):
                return BootDecision(machine.id, True, None)
            token = auth.new_token(auth.ENROLLMENT_PREFIX)
            tx.put_token(
                Token(
                    token.id,
                    TokenKind.ENROLLMENT,
                    token.secret_hash,
                    now,
                    mac=mac,
                    expires_at=now + self.policy.enrollment_ttl,
                )
            )
            return BootDecision(machine.id, False, token.text)

    def register(self, request: RegisterRequest) -> RegisterReply:
        now = self.clock()
        token_id, secret = self._parse(request.enrollment_token, auth.ENROLLMENT_PREFIX, "enrollment token")
        uuid, macs = identity(request.inventory)
        with self.store.transaction() as tx:
            token = tx.token(token_id)
            if (
                token is None
                or token.kind is not TokenKind.ENROLLMENT
                or not auth.secret_matches(secret, token.secret_hash)
            ):
                raise Denied("enrollment token: unknown (expected one from this controller's boot script)")
            if token.used_at is not None:
                raise Denied(
                    f"enrollment token {token_id}: already used; boot the machine again for a new one"
                )
            if token.expires_at is not None and token.expires_at < now:
                raise Denied(
                    f"enrollment token {token_id}: expired {now - token.expires_at:.0f}s ago; reboot"
                )
            if token.mac not in macs:
                raise Denied(
                    f"enrollment token {token_id}: issued to MAC {token.mac}, not to this machine {macs}"
                )
            tx.put_token(replace(token, used_at=now))
            machine = (tx.machine_by_uuid(uuid) if uuid else None) or next(
                (m for m in map(tx.machine_by_mac, macs) if m is not None), None
            )
            if machine is None:
                machine = Machine(new_id("m"), MachineState.DISCOVERED, macs, created_at=now)
            for mac in macs:  # a machine found by UUID absorbs the `discovered` stub its boot created
                stub = tx.machine_by_mac(mac)
                if stub is not None and stub.id != machine.id and stub.state is MachineState.DISCOVERED:
                    tx.delete_machine(stub.id)
            machine = replace(
                machine,
                state=jobs.machine_on_register(machine.state),
                macs=macs,
                system_uuid=uuid,
                hostname=request.inventory.system.hostname or machine.hostname,
                inventory=request.inventory,
                last_seen=now,
            )
            tx.put_machine(machine)
            tx.add_inventory(InventoryRecord(machine.id, now, request.inventory))
            tx.delete_tokens(machine.id, TokenKind.AGENT)
            agent_token = auth.new_token(auth.AGENT_PREFIX)
            tx.put_token(Token(agent_token.id, TokenKind.AGENT, agent_token.secret_hash, now, machine.id))
        return RegisterReply(
            machine.id, agent_token.text, self.policy.heartbeat_seconds, self.policy.poll_seconds
        )

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
            if machine.system_uuid and uuid and uuid != machine.system_uuid:
                raise Conflict(
                    f"{machine.label}: inventory.system.uuid is {uuid}, expected {machine.system_uuid}"
                )
            hostname = inventory.system.hostname or machine.hostname
            tx.put_machine(replace(machine, inventory=inventory, macs=macs, hostname=hostname, last_seen=now))
            tx.add_inventory(InventoryRecord(machine.id, now, inventory))

    # -- agent work ----------------------------------------------------------------------------------

    def _own_job(self, tx: Tx, machine_id: str, job_id: str) -> Job:
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
            job = self._own_job(tx, machine_id, beat.job_id)
            if job.state is not JobState.RUNNING:
                return HeartbeatReply(cancel=(job.id,))
            status = jobs.renew(job.id, job.status, job.status.attempts, now, self.policy.lease_seconds)
            tx.put_job(replace(job, status=status, updated_at=now))
            return HeartbeatReply()

    def claim(self, machine_id: str) -> Assignment | None:
        """The machine's running job (handed again, e.g. to a restarted agent) or its oldest queued one."""
        now = self.clock()
        with self.store.transaction() as tx:
            machine = tx.machine(machine_id)
            if machine is None:
                raise NotFound(f"machine {machine_id}: deleted; register again")
            job = tx.next_job(machine_id)
            if job is None:
                return None
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
