"""The job and machine state machine: pure decisions, no I/O.

A job goes queued -> running (claimed by its machine's agent, under a lease that
heartbeats and events renew) -> succeeded | failed | cancelled. A lease that runs
out re-queues the job while attempts remain and the kind is safe to repeat, and
fails it otherwise; either way the reason is recorded. The machine's state follows
its jobs: deploy -> deploying -> deployed, erase -> erasing -> ready, any failure of
a disk-writing job -> failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from agent.protocol import JobKind, Outcome
from controller.errors import ControllerError


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE = (JobState.QUEUED, JobState.RUNNING)


class MachineState(enum.StrEnum):
    DISCOVERED = "discovered"  # seen at PXE boot, never registered
    READY = "ready"  # registered, disk state unknown or erased; boots the agent
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"  # boots from its disk
    ERASING = "erasing"
    FAILED = "failed"
    QUARANTINED = "quarantined"  # registered with hardware unlike its fingerprint; no jobs until accepted


# Kinds whose re-run after a lost agent is safe: a deploy resumes (chunks already on the
# disk are skipped), erase/verify/inventory are idempotent. A reboot may already have
# happened, so it is never repeated.
RETRYABLE = frozenset({JobKind.DEPLOY, JobKind.ERASE, JobKind.VERIFY, JobKind.INVENTORY})
DEFAULT_MAX_ATTEMPTS = 3


class TransitionError(ControllerError):
    """A change the state machine does not allow; the message names the job and its state."""


@dataclass(frozen=True)
class JobStatus:
    """The part of a job the state machine decides."""

    state: JobState
    attempts: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_deadline: float | None = None
    reason: str = ""


def claim(job_id: str, status: JobStatus, now: float, lease: float) -> JobStatus:
    """Hand a queued job to its agent (a new attempt), or re-hand a running one (same attempt)."""
    if status.state is JobState.RUNNING:
        return replace(status, lease_deadline=now + lease)
    if status.state is not JobState.QUEUED:
        raise TransitionError(f"job {job_id}: expected queued to start it, but it is {status.state}")
    return replace(status, state=JobState.RUNNING, attempts=status.attempts + 1, lease_deadline=now + lease)


def renew(job_id: str, status: JobStatus, attempt: int, now: float, lease: float) -> JobStatus:
    """Extend the lease of the running attempt `attempt` (events and heartbeats do this)."""
    check_attempt(job_id, status, attempt)
    return replace(status, lease_deadline=max(status.lease_deadline or 0.0, now + lease))


def check_attempt(job_id: str, status: JobStatus, attempt: int) -> None:
    if status.state is not JobState.RUNNING:
        raise TransitionError(f"job {job_id}: expected running, but it is {status.state}")
    if attempt != status.attempts:
        raise TransitionError(
            f"job {job_id}: attempt {attempt} is stale, the current attempt is {status.attempts}"
        )


def finish(job_id: str, status: JobStatus, attempt: int, outcome: Outcome, message: str) -> JobStatus:
    check_attempt(job_id, status, attempt)
    state = JobState.SUCCEEDED if outcome is Outcome.SUCCEEDED else JobState.FAILED
    return replace(
        status, state=state, lease_deadline=None, reason=message if state is JobState.FAILED else ""
    )


def cancel(job_id: str, status: JobStatus, who: str) -> JobStatus:
    if status.state.terminal:
        raise TransitionError(
            f"job {job_id}: expected queued or running to cancel it, but it is {status.state}"
        )
    return replace(status, state=JobState.CANCELLED, lease_deadline=None, reason=f"cancelled by {who}")


def fail_unclaimed(job_id: str, status: JobStatus, reason: str) -> JobStatus:
    """A queued job no agent will claim (its machine's BMC failed, or no agent came in time)."""
    if status.state is not JobState.QUEUED:
        raise TransitionError(f"job {job_id}: expected queued to fail it unclaimed, but it is {status.state}")
    return replace(status, state=JobState.FAILED, lease_deadline=None, reason=reason)


def lease_expired(status: JobStatus, now: float) -> bool:
    return (
        status.state is JobState.RUNNING and status.lease_deadline is not None and status.lease_deadline < now
    )


def expire(kind: JobKind, status: JobStatus, now: float) -> JobStatus:
    """A running job whose lease ran out: re-queue it if allowed, else fail it; the reason says which."""
    overdue = now - (status.lease_deadline or now)
    lost = f"lease expired {overdue:.0f}s ago (no heartbeat from the agent) in attempt {status.attempts}"
    if kind in RETRYABLE and status.attempts < status.max_attempts:
        return replace(status, state=JobState.QUEUED, lease_deadline=None, reason=f"{lost}; re-queued")
    why = (
        "not retried for a " + kind.value if kind not in RETRYABLE else f"{status.max_attempts} attempts used"
    )
    return replace(status, state=JobState.FAILED, lease_deadline=None, reason=f"{lost}; failed ({why})")


def machine_on_start(machine: MachineState, kind: JobKind) -> MachineState:
    if kind is JobKind.DEPLOY:
        return MachineState.DEPLOYING
    if kind is JobKind.ERASE:
        return MachineState.ERASING
    return machine


def machine_on_end(machine: MachineState, kind: JobKind, state: JobState) -> MachineState:
    """The machine's state once a job ends (succeeded, failed, cancelled, or re-queued)."""
    writes_disk = kind in (JobKind.DEPLOY, JobKind.ERASE)
    if state is JobState.SUCCEEDED:
        if kind is JobKind.DEPLOY:
            return MachineState.DEPLOYED
        if kind is JobKind.ERASE:
            return MachineState.READY
        return machine
    if state is JobState.QUEUED:
        return machine
    if writes_disk and machine in (MachineState.DEPLOYING, MachineState.ERASING):
        return MachineState.FAILED  # the disk was being written: its content is unknown
    return machine


def machine_on_register(machine: MachineState | None) -> MachineState:
    if machine in (None, MachineState.DISCOVERED):
        return MachineState.READY
    return machine


def boots_from_disk(machine: MachineState | None, has_active_job: bool) -> bool:
    """iPXE decision: a deployed machine with nothing to do boots its disk; all else boots the agent."""
    return machine is MachineState.DEPLOYED and not has_active_job
