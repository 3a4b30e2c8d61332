"""Issue 15 item 5's real case, small: 4 agent processes (the product's runtime, sledge.peers=1), each in
a network namespace of its own with tc caps on its link (down and up), writing to loop devices, against
a real `sledge serve` whose egress is capped as well (scripts/benchlib/fleetreal.py, as the bench runs
it at N = 10).

Asserts: every loop device holds the image; the origin served about one copy and the peers the rest;
no agent's download ever ran over its cap (the hub's port counters, 2-s windows) and none finished
sooner than the cap allows, so the caps are real; nothing of the run is left behind.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from agent.image.manifest import ChunkKind
from controller.images.importer import ImportOptions, import_image
from controller.images.sources import RawSource
from controller.images.store import WritableStore
from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchlib.fleetreal import PREFIX, run_real_case  # noqa: E402

pytestmark = pytest.mark.root
MiB = 1 << 20
N = 4
# 40 chunks of 1 MiB (the smallest chunk): pieces enough for 4 agents to trade, and enough that the
# chunks the first agent takes from the origin while it is still alone in the swarm (up to its
# fetch threads' worth, 6 here) stay a small part of S
SIZE = 40 * MiB
B = 2 * MiB  # each agent's cap, down and up: S/B = 20 s
ORIGIN = 2 * MiB  # the origin's egress cap: one agent's worth, so most bytes must come from peers
LINGER = 4.0  # seconds a finished agent serves on


def test_four_agents_in_namespaces_share_chunks_under_tc_caps(tmp_path: Path) -> None:
    need("ip", "tc", "losetup", "blockdev", "curl")
    src = tmp_path / "fleet.img"
    src.write_bytes(random.Random(1515).randbytes(SIZE))
    store = WritableStore(tmp_path / "store")
    source = RawSource(str(src))
    try:
        manifest = import_image(store, source, ImportOptions("fleet", "1", chunk_size=MiB)).manifest
    finally:
        source.close()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    s = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA)
    lines: list[str] = []

    result = run_real_case(tmp_path / "run", N, store.root, manifest, sha, B, ORIGIN, LINGER, lines.append)

    print(
        f"origin {result.origin_bytes / s:.2f} S, peers {result.peer_bytes / s:.2f} S, done at "
        f"{[round(t * B / s, 2) for t in sorted(result.times)]} S/B, top download "
        f"{[round(a.top_down / B, 2) for a in result.agents]} B, origin top {result.origin_top / ORIGIN:.2f}"
    )
    assert result.failed == [], result.failed
    assert result.bad_targets == 0
    assert len(result.times) == N
    # about one copy from the origin (its own sledge_served_bytes_total), the rest from peers
    assert result.origin_bytes <= 1.3 * s, f"origin served {result.origin_bytes / s:.2f} S, expected <= 1.3 S"
    assert result.peer_bytes >= N * s - result.origin_bytes, (result.peer_bytes, result.origin_bytes, s)
    assert result.peer_bytes >= (N - 1.3) * s
    # the caps hold: no 2-s window above B (+10% for tbf's burst and the counters' framing), no agent
    # done sooner than its link allows, and the links did fill up to the cap (so it was tested)
    for a in result.agents:
        assert a.top_down <= 1.1 * B, f"agent {a.index}: top download {a.top_down / B:.2f} B, cap 1.1 B"
        assert a.seconds is not None and a.seconds >= 0.9 * s / B, (a.index, a.seconds, s / B)
    assert max(a.top_down for a in result.agents) >= 0.8 * B, [a.top_down / B for a in result.agents]
    assert result.origin_top <= 1.1 * ORIGIN, (
        f"origin's top egress {result.origin_top / ORIGIN:.2f} x its cap"
    )
    # nothing left: namespaces, loop devices, processes
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [ns for ns in namespaces if ns.startswith(PREFIX)], namespaces
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True).stdout
    assert "sledge-fleetreal-" not in loops
    assert all(a.proc is not None and a.proc.poll() is not None for a in result.agents)
