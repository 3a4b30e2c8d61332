"""The job/machine state machine, as tables."""

from __future__ import annotations

import pytest

from agent.protocol import JobKind, Outcome
from controller import jobs
from controller.jobs import JobState, JobStatus, MachineState, TransitionError

Q = JobStatus(JobState.QUEUED)


def test_claim_starts_an_attempt_with_a_lease() -> None:
    s = jobs.claim("j", Q, now=100.0, lease=60.0)
    assert (s.state, s.attempts, s.lease_deadline) == (JobState.RUNNING, 1, 160.0)
    again = jobs.claim("j", s, now=130.0, lease=60.0)  # re-handed to a restarted agent
    assert (again.attempts, again.lease_deadline) == (1, 190.0)


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_claim_refuses_ended_jobs(state: JobState) -> None:
    with pytest.raises(TransitionError, match=f"job j: expected queued to start it, but it is {state}"):
        jobs.claim("j", JobStatus(state), 0.0, 60.0)


def test_renew_only_the_current_attempt() -> None:
    s = jobs.claim("j", JobStatus(JobState.QUEUED, attempts=1), 0.0, 60.0)
    assert jobs.renew("j", s, 2, 50.0, 60.0).lease_deadline == 110.0
    assert jobs.renew("j", s, 2, 0.0, 10.0).lease_deadline == 60.0  # never shortened
    with pytest.raises(TransitionError, match="attempt 1 is stale, the current attempt is 2"):
        jobs.renew("j", s, 1, 50.0, 60.0)
    with pytest.raises(TransitionError, match="expected running, but it is queued"):
        jobs.renew("j", Q, 0, 50.0, 60.0)


@pytest.mark.parametrize(
    ("outcome", "state", "reason"),
    [(Outcome.SUCCEEDED, JobState.SUCCEEDED, ""), (Outcome.FAILED, JobState.FAILED, "disk on fire")],
)
def test_finish(outcome: Outcome, state: JobState, reason: str) -> None:
    s = jobs.finish("j", jobs.claim("j", Q, 0.0, 60.0), 1, outcome, "disk on fire")
    assert (s.state, s.lease_deadline, s.reason) == (state, None, reason)


@pytest.mark.parametrize(
    ("state", "ok"),
    [
        (JobState.QUEUED, True),
        (JobState.RUNNING, True),
        (JobState.SUCCEEDED, False),
        (JobState.CANCELLED, False),
    ],
)
def test_cancel(state: JobState, ok: bool) -> None:
    if ok:
        s = jobs.cancel("j", JobStatus(state), "operator")
        assert (s.state, s.reason) == (JobState.CANCELLED, "cancelled by operator")
    else:
        with pytest.raises(TransitionError, match="expected queued or running to cancel it"):
            jobs.cancel("j", JobStatus(state), "operator")


@pytest.mark.parametrize(
    ("kind", "attempts", "state", "why"),
    [
        (JobKind.DEPLOY, 1, JobState.QUEUED, "re-queued"),
        (JobKind.DEPLOY, 3, JobState.FAILED, "failed (3 attempts used)"),
        (JobKind.ERASE, 2, JobState.QUEUED, "re-queued"),
        (JobKind.INVENTORY, 1, JobState.QUEUED, "re-queued"),
        (JobKind.REBOOT, 1, JobState.FAILED, "failed (not retried for a reboot)"),
    ],
)
def test_expire(kind: JobKind, attempts: int, state: JobState, why: str) -> None:
    running = JobStatus(JobState.RUNNING, attempts, 3, lease_deadline=100.0)
    assert not jobs.lease_expired(running, 100.0)
    assert jobs.lease_expired(running, 100.5)
    s = jobs.expire(kind, running, 130.0)
    assert s.state is state
    assert s.reason == f"lease expired 30s ago (no heartbeat from the agent) in attempt {attempts}; {why}"
    assert s.lease_deadline is None


M = MachineState
S = JobState


@pytest.mark.parametrize(
    ("machine", "kind", "end", "after"),
    [
        (M.DEPLOYING, JobKind.DEPLOY, S.SUCCEEDED, M.DEPLOYED),
        (M.DEPLOYING, JobKind.DEPLOY, S.FAILED, M.FAILED),
        (M.DEPLOYING, JobKind.DEPLOY, S.CANCELLED, M.FAILED),
        (M.DEPLOYING, JobKind.DEPLOY, S.QUEUED, M.DEPLOYING),
        (M.ERASING, JobKind.ERASE, S.SUCCEEDED, M.READY),
        (M.ERASING, JobKind.ERASE, S.FAILED, M.FAILED),
        (M.DEPLOYED, JobKind.DEPLOY, S.CANCELLED, M.DEPLOYED),  # cancelled while queued: disk untouched
        (M.DEPLOYED, JobKind.VERIFY, S.FAILED, M.DEPLOYED),
        (M.READY, JobKind.INVENTORY, S.SUCCEEDED, M.READY),
    ],
)
def test_machine_on_end(machine: MachineState, kind: JobKind, end: JobState, after: MachineState) -> None:
    assert jobs.machine_on_end(machine, kind, end) is after


@pytest.mark.parametrize(
    ("machine", "kind", "after"),
    [
        (M.READY, JobKind.DEPLOY, M.DEPLOYING),
        (M.DEPLOYED, JobKind.ERASE, M.ERASING),
        (M.DEPLOYED, JobKind.VERIFY, M.DEPLOYED),
    ],
)
def test_machine_on_start(machine: MachineState, kind: JobKind, after: MachineState) -> None:
    assert jobs.machine_on_start(machine, kind) is after


@pytest.mark.parametrize(
    ("machine", "active", "disk"),
    [
        (M.DEPLOYED, False, True),
        (M.DEPLOYED, True, False),
        (M.READY, False, False),
        (None, False, False),
        (M.FAILED, False, False),
        (M.DISCOVERED, False, False),
    ],
)
def test_boots_from_disk(machine: MachineState | None, active: bool, disk: bool) -> None:
    assert jobs.boots_from_disk(machine, active) is disk


def test_register_moves_only_new_machines_to_ready() -> None:
    assert jobs.machine_on_register(None) is M.READY
    assert jobs.machine_on_register(M.DISCOVERED) is M.READY
    assert jobs.machine_on_register(M.DEPLOYED) is M.DEPLOYED
