"""Two real agents (agent.runtime) deploy one image from a real `sledge serve` with peers on
(sledge.peers=1): the controller tracks, issues tickets, and the second agent takes chunks from
the first instead of the origin."""

from __future__ import annotations

import dataclasses
import re
import threading
import urllib.request
from pathlib import Path

from agent.image.manifest import ChunkKind
from agent.runtime.backoff import Backoff
from agent.runtime.config import AgentConfig
from agent.runtime.devices import BlockDisks, HttpSources
from agent.runtime.loop import Agent
from agent.runtime.machine import FakeMachine
from agent.runtime.transport import HttpTransport
from agent.writer.load import load_manifest
from agent.writer.sources import DirectorySource
from tests.images import MiB, random_image
from tests.integration.test_agent_runtime import disk, import_into, job, server, wait_for
from tests.integration.test_controller_serve import Server
from tests.unit.test_controller_kit import inventory

__all__ = ["server"]  # the fixture
MACS = ("52:54:00:00:00:31", "52:54:00:00:00:32")


def served_bytes(server: Server) -> int:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^sledge_served_bytes_total (\d+)", text, re.M)
    assert match, text[:500]
    return int(match.group(1))


def start(server: Server, tmp_path: Path, i: int) -> tuple[Path, list[str], threading.Thread]:
    target = tmp_path / f"disk{i}.img"
    inv = inventory(uuid=f"4c4c4544-0000-1000-8000-00000000003{i}", macs=(MACS[i],), hostname=f"n{i}")
    machine = FakeMachine(dataclasses.replace(inv, disks=(disk(target),)))
    config = AgentConfig(
        controller=server.url,
        mac=MACS[i],
        state_dir=str(tmp_path / f"state{i}"),
        heartbeat=0.3,
        poll_wait=1.0,
        max_backoff=0.5,
        workers=2,
        peers=True,
        peer_host="127.0.0.1",
        peer_linger=4.0,
    )
    lines: list[str] = []
    agent = Agent(
        config,
        HttpTransport(server.url, timeout=5),
        machine,
        lines.append,
        backoff=Backoff(0.05, 0.5),
        sources=HttpSources(),
        disks=BlockDisks(),
    )
    thread = threading.Thread(target=agent.run, args=(1,), daemon=True)
    thread.start()
    return target, lines, thread


def test_two_agents_deploy_one_image_and_the_second_takes_chunks_from_the_first(
    server: Server, tmp_path: Path
) -> None:
    src = random_image(tmp_path / "img", 16 * MiB, seed=31)
    digest = import_into(server, src, "shared", "1")
    manifest = load_manifest(digest, [DirectorySource(str(server.data / "store"))]).manifest
    one_copy = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA)
    agents = [start(server, tmp_path, i) for i in range(2)]
    wait_for(lambda: len(_machines(server)) == 2)
    before = served_bytes(server)
    ids = []
    for mac in MACS:
        status, body = server.call(
            "POST", "/v1/jobs", {"machine": mac, "kind": "deploy", "image": "shared:1"}, server.operator
        )
        assert status == 201, body
        ids.append(body["id"])
    for job_id in ids:
        wait_for(lambda j=job_id: job(server, j)["state"] in ("succeeded", "failed"), timeout=60)
        assert job(server, job_id)["state"] == "succeeded", job(server, job_id)
    data = src.read_bytes()
    for target, _, thread in agents:
        assert target.read_bytes()[: len(data)] == data
        thread.join(10)
    summaries = [
        re.search(r"peers: fetched (\d+) bytes from (\d+) peers; served (\d+) bytes", "\n".join(lines))
        for _, lines, _ in agents
    ]
    assert all(summaries), [lines[-5:] for _, lines, _ in agents]
    fetched = [int(m.group(1)) for m in summaries if m]
    served = [int(m.group(3)) for m in summaries if m]
    (tmp_path / "agents.log").write_text("\n".join(agents[0][1] + ["----"] + agents[1][1]))
    assert sum(fetched) > 0 and sum(fetched) == sum(served), (fetched, served)
    origin = served_bytes(server) - before
    assert origin <= 2 * one_copy - sum(fetched) + 64 * 1024, (origin, one_copy, fetched)
    assert origin < 2 * one_copy


def _machines(server: Server) -> list[dict]:  # type: ignore[type-arg]
    status, body = server.call("GET", "/v1/machines", token=server.operator)
    assert status == 200
    items = body["machines"] if isinstance(body, dict) and "machines" in body else body.get("items", [])
    return [m for m in items if m["state"] != "discovered"]
