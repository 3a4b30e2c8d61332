"""The agent runtime against a real `sledge serve` process (SQLite, HTTP on 127.0.0.1):
register, deploy, verify, erase, events, finish; a controller killed mid-job; a
refused token leading to a new enrollment."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import protocol as p
from agent.hardware.model import Disk
from agent.runtime.backoff import Backoff
from agent.runtime.config import AgentConfig
from agent.runtime.devices import BlockDisks, HttpSources
from agent.runtime.loop import Agent
from agent.runtime.machine import FakeMachine
from agent.runtime.transport import HttpTransport
from controller.images.importer import ImportOptions, import_image
from controller.images.sources import RawSource
from controller.images.store import WritableStore
from tests.images import MiB, half_sparse_image
from tests.integration.test_controller_serve import MAC, Server, free_port
from tests.tools import need
from tests.unit.test_controller_kit import inventory


def disk(path: Path) -> Disk:
    """A 'disk' that is a file: an 8 GiB virtio disk as far as selection is concerned."""
    return Disk(
        "vda",
        str(path),
        "disk",
        8 << 30,
        "QEMU HARDDISK",
        None,
        "SERIAL1",
        None,
        None,
        None,
        True,
        False,
        False,
        512,
        512,
        "virtio",
        None,
        (),
        (),
        (),
        (),
        (),
        False,
    )


class GatedMachine(FakeMachine):
    """Inventory calls can be held at a gate, to act while a job is at a known point."""

    def __init__(self, target: Path) -> None:
        base = inventory(macs=(MAC,))
        super().__init__(dataclasses.replace(base, disks=(disk(target),)))
        self.calls = 0
        self.hold_at: int | None = None
        self.reached = threading.Event()
        self.release = threading.Event()

    def inventory(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.hold_at:
            self.reached.set()
            self.release.wait(30)
        return super().inventory()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", free_port())
    s.start()
    yield s
    s.stop()


def import_into(server: Server, src: Path, name: str, version: str) -> str:
    store = WritableStore(server.data / "store")
    source = RawSource(str(src))
    try:
        return import_image(store, source, ImportOptions(name, version, chunk_size=MiB)).digest
    finally:
        source.close()


def start_agent(
    server: Server, machine: FakeMachine, tmp_path: Path, jobs: int
) -> tuple[Agent, threading.Thread, list[str]]:
    lines: list[str] = []
    config = AgentConfig(
        controller=server.url,
        mac=MAC,
        state_dir=str(tmp_path / "agent-state"),
        heartbeat=0.3,
        poll_wait=1.0,
        max_backoff=0.5,
        workers=2,
    )
    agent = Agent(
        config,
        HttpTransport(server.url, timeout=5),
        machine,
        lines.append,
        backoff=Backoff(0.05, 0.5),
        sources=HttpSources(),
        disks=BlockDisks(),
    )
    thread = threading.Thread(target=agent.run, args=(jobs,), daemon=True)
    thread.start()
    return agent, thread, lines


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def machine_registered(server: Server) -> bool:
    status, body = server.call("GET", "/v1/machines", token=server.operator)
    return status == 200 and any(
        MAC in m.get("macs", []) and m["state"] != "discovered" for m in _items(body)
    )


def _items(body: object) -> list[dict]:  # type: ignore[type-arg]
    if isinstance(body, dict):
        for key in ("machines", "items", "jobs", "events"):
            if key in body:
                return list(body[key])
    return list(body) if isinstance(body, list) else []


def job(server: Server, job_id: str) -> dict:  # type: ignore[type-arg]
    status, body = server.call("GET", f"/v1/jobs/{job_id}", token=server.operator)
    assert status == 200, body
    return body


def create(server: Server, kind: str, **extra: object) -> str:
    status, body = server.call("POST", "/v1/jobs", {"machine": MAC, "kind": kind, **extra}, server.operator)
    assert status == 201, body
    return str(body["id"])


def agent_seqs(detail: dict) -> list[int]:  # type: ignore[type-arg]
    return [e["seq"] for e in detail["events"] if e.get("seq") is not None]


def test_deploy_then_verify_then_erase(server: Server, tmp_path: Path) -> None:
    src = half_sparse_image(tmp_path / "img", 10 * MiB + 512, stripe=MiB)
    import_into(server, src, "demo", "1")
    target = tmp_path / "disk.img"
    machine = GatedMachine(target)
    _agent, thread, _lines = start_agent(server, machine, tmp_path, jobs=3)
    wait_for(lambda: machine_registered(server))

    deploy_id = create(server, "deploy", image="demo:1")
    wait_for(lambda: job(server, deploy_id)["state"] in ("succeeded", "failed"))
    detail = job(server, deploy_id)
    assert detail["state"] == "succeeded", detail
    assert target.read_bytes()[: src.stat().st_size] == src.read_bytes()
    seqs = agent_seqs(detail)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3
    assert machine.actions == [p.PowerAction.REBOOT]  # after the controller has the result

    verify_id = create(server, "verify", image="demo:1")
    wait_for(lambda: job(server, verify_id)["state"] in ("succeeded", "failed"))
    assert job(server, verify_id)["state"] == "succeeded"

    erase_id = create(server, "erase", params={"erase_mode": "full"})
    wait_for(lambda: job(server, erase_id)["state"] in ("succeeded", "failed"))
    assert job(server, erase_id)["state"] == "succeeded", job(server, erase_id)["result"]
    assert target.read_bytes().count(0) == target.stat().st_size
    thread.join(10)
    assert not thread.is_alive()


def test_controller_killed_mid_job_the_job_completes_and_no_event_is_lost(
    server: Server, tmp_path: Path
) -> None:
    src = half_sparse_image(tmp_path / "img", 12 * MiB, stripe=MiB)
    import_into(server, src, "demo", "1")
    target = tmp_path / "disk.img"
    machine = GatedMachine(target)
    _agent, thread, lines = start_agent(server, machine, tmp_path, jobs=1)
    wait_for(lambda: machine_registered(server))
    machine.hold_at = machine.calls + 1  # the deploy's disk selection
    deploy_id = create(server, "deploy", image="demo:1")
    assert machine.reached.wait(30)
    server.kill9()
    machine.release.set()  # the job goes on with no controller: manifest retries, events wait
    time.sleep(1.5)
    server.start()
    thread.join(60)
    assert not thread.is_alive(), "\n".join(lines[-20:])
    detail = job(server, deploy_id)
    assert detail["state"] == "succeeded", detail
    assert target.read_bytes() == src.read_bytes()
    seqs = agent_seqs(detail)
    assert seqs == list(range(1, len(seqs) + 1))  # none lost, none doubled
    assert any(
        "retrying" in e.get("message", "") for e in detail["events"]
    )  # the outage was seen and reported


def test_refused_agent_token_leads_to_a_new_enrollment(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    machine = GatedMachine(target)
    state = tmp_path / "agent-state"
    state.mkdir()
    (state / "agent.json").write_text('{"agent_token": "forged-token", "machine_id": "m-000000000000"}')
    _agent, thread, lines = start_agent(server, machine, tmp_path, jobs=1)
    wait_for(lambda: machine_registered(server))
    inv_id = create(server, "inventory")
    thread.join(30)
    assert job(server, inv_id)["state"] == "succeeded"
    assert any("refused" in line for line in lines)
    assert "forged-token" not in (state / "agent.json").read_text()


def test_operator_cancel_stops_the_job_at_a_chunk_boundary(server: Server, tmp_path: Path) -> None:
    src = half_sparse_image(tmp_path / "img", 12 * MiB, stripe=MiB)
    import_into(server, src, "demo", "1")
    target = tmp_path / "disk.img"
    target.write_bytes(b"\x01" * (12 * MiB))
    machine = GatedMachine(target)
    _agent, thread, lines = start_agent(server, machine, tmp_path, jobs=1)
    wait_for(lambda: machine_registered(server))
    machine.hold_at = machine.calls + 1
    deploy_id = create(server, "deploy", image="demo:1")
    assert machine.reached.wait(30)
    status, body = server.call("POST", f"/v1/jobs/{deploy_id}/cancel", {}, server.operator)
    assert status == 200, body
    wait_for(lambda: any("cancelled by the controller" in line for line in lines), 10)
    machine.release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert job(server, deploy_id)["state"] == "cancelled"
    assert target.read_bytes() == b"\x01" * (12 * MiB)  # stopped before the first chunk
    assert machine.actions == []  # no reboot after a cancelled deploy


def test_deploy_with_a_cloud_init_seed_then_verify(server: Server, tmp_path: Path) -> None:
    import subprocess

    need("sgdisk", "mcopy")
    src = tmp_path / "gpt.img"
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["sgdisk", "-n", "1:2048:+8M", "-n", "2:0:0", str(src)], check=True, capture_output=True)
    import_into(server, src, "gpt", "1")
    target = tmp_path / "disk.img"
    with open(target, "wb") as f:
        f.truncate(256 * MiB)
    machine = GatedMachine(target)
    _, thread, _ = start_agent(server, machine, tmp_path, jobs=2)
    wait_for(lambda: machine_registered(server))
    seed = {"user_data": "#cloud-config\nhostname: web-7\n", "network_config": "version: 2\n"}
    deploy_id = create(server, "deploy", image="gpt:1", params={"cloud_init": seed})
    wait_for(lambda: job(server, deploy_id)["state"] in ("succeeded", "failed"))
    detail = job(server, deploy_id)
    assert detail["state"] == "succeeded", detail["result"]
    assert "cloud-init seed in partition 3" in detail["result"]["message"]
    table = subprocess.run(["sgdisk", "-v", str(target)], capture_output=True, text=True).stdout
    assert "No problems found" in table
    info = subprocess.run(["sgdisk", "-i", "3", str(target)], capture_output=True, text=True).stdout
    first = int(info.split("First sector: ")[1].split()[0])
    got = subprocess.run(
        ["mcopy", "-n", "-i", f"{target}@@{first * 512}", "::user-data", "-"], capture_output=True, text=True
    )
    assert got.stdout == seed["user_data"]
    got = subprocess.run(
        ["mcopy", "-n", "-i", f"{target}@@{first * 512}", "::meta-data", "-"], capture_output=True, text=True
    )
    assert deploy_id in got.stdout  # instance-id: a new instance per deploy
    verify_id = create(server, "verify", image="gpt:1")
    wait_for(lambda: job(server, verify_id)["state"] in ("succeeded", "failed"))
    # the seed changed the image's partition table, which is not drift, and says so
    verified = job(server, verify_id)
    assert verified["state"] == "succeeded", verified["result"]
    assert "differ only in the partition table" in verified["result"]["message"]
    thread.join(20)
