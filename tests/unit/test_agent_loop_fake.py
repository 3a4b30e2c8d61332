"""The job loop against the in-memory controller (agent.runtime.fake): no server, no disk
(disks are sparse files behind agent.runtime.devices.SparseDisks)."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path

import pytest

from agent import protocol as p
from agent.runtime.backoff import Backoff
from agent.runtime.config import AgentConfig
from agent.runtime.devices import DirectorySources, SparseDisks
from agent.runtime.fake import FakeTransport
from agent.runtime.jobs.erase import STEP
from agent.runtime.loop import Agent
from agent.runtime.machine import FakeMachine
from tests.jobkit import GiB, fake_disk
from tests.unit.test_controller_kit import inventory

DISK = fake_disk("vda", size=16 * GiB)


def make(
    tmp_path: Path,
    transport: FakeTransport,
    token: str = "enroll-1",
    pace: float = 0.0,
    network_mark: str = "",
) -> tuple[Agent, list[str], SparseDisks]:
    config = AgentConfig(
        controller="http://c",
        token=token,
        mac="52:54:00:00:00:01",
        state_dir=str(tmp_path),
        heartbeat=0.05,
        network_mark=network_mark,
    )
    lines: list[str] = []
    disks = SparseDisks(tmp_path / "disks", {DISK.path: DISK.size}, pace=pace)
    agent = Agent(
        config,
        transport,
        FakeMachine(dataclasses.replace(inventory(), disks=(DISK,))),
        lines.append,
        backoff=Backoff(0.01, 0.05),
        sources=DirectorySources(tmp_path / "store"),
        disks=disks,
    )
    return agent, lines, disks


def test_registers_runs_jobs_in_order_and_reports(tmp_path: Path) -> None:
    t = FakeTransport()
    first = t.add_job(p.JobKind.INVENTORY)
    second = t.add_job(p.JobKind.REBOOT, p.JobParams(power=p.PowerAction.POWEROFF))
    agent, _, _ = make(tmp_path, t)
    assert agent.run(max_jobs=2) == 2
    assert t.jobs[first].result is not None and t.jobs[first].result.outcome is p.Outcome.SUCCEEDED
    assert len(t.inventories) == 2  # at registration, and the inventory job's refresh
    assert [e.seq for e in t.jobs[first].events] == list(range(1, len(t.jobs[first].events) + 1))
    assert agent.machine.actions == [p.PowerAction.POWEROFF]  # type: ignore[attr-defined]
    reboot_result = t.jobs[second].result
    assert reboot_result is not None and reboot_result.outcome is p.Outcome.SUCCEEDED


def test_outage_mid_job_buffers_events_and_finishes_on_return(tmp_path: Path) -> None:
    t = FakeTransport()
    job = t.add_job(p.JobKind.INVENTORY)
    agent, lines, _ = make(tmp_path, t)
    real_post = t.post_inventory

    def post_then_fail(token: str, inv: object) -> None:
        real_post(token, inv)  # type: ignore[arg-type]
        t.down = True  # the controller goes away mid-job
        threading.Timer(0.3, lambda: setattr(t, "down", False)).start()

    t.post_inventory = post_then_fail  # type: ignore[method-assign]
    agent.run(max_jobs=1)
    result = t.jobs[job].result
    assert result is not None and result.outcome is p.Outcome.SUCCEEDED
    seqs = [e.seq for e in t.jobs[job].events]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 2
    assert t.failed_calls > 0 and any("retrying" in line for line in lines)


def test_used_enrollment_token_leads_to_a_fresh_one_from_the_boot_script(tmp_path: Path) -> None:
    t = FakeTransport()
    t.add_job(p.JobKind.INVENTORY)
    agent, lines, _ = make(tmp_path, t, token="already-used")
    agent.run(max_jobs=1)
    assert "boot_script" in t.calls
    assert any("enrollment refused" in line for line in lines)


def test_cancel_from_heartbeat_stops_the_job(tmp_path: Path) -> None:
    """A full erase of a slow 16 GiB disk (64 steps of 0.05 s: over 3 s) stops within a step or two
    of the heartbeat that carries the cancel; without the cancel it would finish and succeed."""
    t = FakeTransport()
    job = t.add_job(p.JobKind.ERASE, p.JobParams(erase_mode=p.EraseMode.FULL))
    t.jobs[job].cancelled = True
    agent, _, disks = make(tmp_path, t, pace=0.05)
    agent.run(max_jobs=1)
    result = t.jobs[job].result
    assert result is not None and result.outcome is p.Outcome.FAILED, result
    assert "erase of /dev/vda cancelled at offset" in result.message
    (target,) = disks.opened
    steps = DISK.size // STEP
    assert len(target.zeroed) < steps // 2, f"{len(target.zeroed)} of {steps} steps zeroed"
    assert any("stopped: the job was cancelled" in e.message for e in t.jobs[job].events)


def test_agent_refuses_at_start_a_piece_that_lacks_its_interface(tmp_path: Path) -> None:
    config = AgentConfig(controller="http://c", state_dir=str(tmp_path))
    machine = FakeMachine(inventory())
    with pytest.raises(TypeError, match="disks: expected a Disks implementation, got DirectorySources"):
        Agent(
            config,
            FakeTransport(),
            machine,
            sources=DirectorySources(tmp_path),
            disks=DirectorySources(tmp_path),  # type: ignore[arg-type]
        )


def test_registration_waits_for_the_network_mark(tmp_path: Path) -> None:
    # the live image starts the agent beside DHCP: the controller is asked only once /init has
    # made the mark
    t = FakeTransport()
    mark = tmp_path / "network.done"
    agent, lines, _ = make(tmp_path, t, network_mark=str(mark))
    asked: list[bool] = []
    real_register = t.register

    def register(req: p.RegisterRequest) -> p.RegisterReply:
        asked.append(mark.exists())
        return real_register(req)

    t.register = register  # type: ignore[method-assign]
    threading.Timer(0.4, mark.touch).start()
    agent._wait_for_network = functools.partial(agent._wait_for_network, every=0.1)  # type: ignore[method-assign]
    agent._enroll()
    assert asked == [True]
    assert agent.token and any("waiting for the network" in line for line in lines)


def test_a_stopped_agent_does_not_wait_for_the_network(tmp_path: Path) -> None:
    agent, _, _ = make(tmp_path, FakeTransport(), network_mark=str(tmp_path / "never"))
    agent.stop.set()
    started = time.monotonic()
    agent._wait_for_network()  # the mark never comes: a stop ends the wait
    assert time.monotonic() - started < 1
