"""The simulated fleet of the bench (scripts/benchlib/fleetbench.py, section G) spread over worker
processes: the agents in each worker run the product's peer code against the one tracker and the
one origin of the main process, and every agent's figures come back whole.

Small and quick (6 chunks of 1 MiB, 4 MiB/s per agent: S/B = 1.5 s), so that a broken barrier, a
lost result or a clock that differs between the processes fails here and not in a 26-minute bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib import fleetbench
from benchlib.fleetbench import Case, make_image, run_case

MiB = 1 << 20
SIZE = 6 * MiB
B = 4 * MiB  # each agent's cap, down and up


Image = tuple[Path, fleetbench.Manifest, str, str]  # store, manifest, digest, the image's sha256


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return make_image(tmp_path / "image", SIZE)


@pytest.mark.parametrize("procs", [1, 3])
def test_agents_over_worker_processes_share_chunks_and_all_report(
    tmp_path: Path, image: Image, procs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleetbench, "PROCS", procs)
    store, manifest, digest, sha = image
    # the origin sends one agent's worth at a time: most of the 7 copies must come from peers
    r = run_case(tmp_path / "run", store, manifest, digest, sha, Case("peers", 7, True), B, B)
    assert r.failed == []
    assert r.bad_targets == 0
    assert len(r.times) == 7  # every agent's time, from whichever worker ran it
    # one clock for every process: nobody done sooner than its own link allows, nor absurdly late
    assert all(0.8 * SIZE / B <= t <= 60 for t in r.times), r.times
    assert r.origin_bytes <= 2 * SIZE, f"origin sent {r.origin_bytes / SIZE:.2f} S, expected about 1"


def test_a_corrupting_peer_in_one_worker_is_dropped_by_agents_in_the_others(
    tmp_path: Path, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleetbench, "PROCS", 2)
    store, manifest, digest, sha = image
    r = run_case(tmp_path / "run", store, manifest, digest, sha, Case("peers", 6, True, corrupt=True), B, B)
    assert r.failed == []
    assert r.bad_targets == 0
    assert len(r.times) == 5  # the corrupting agent is not counted
    assert r.corrupt_met >= 1  # it claims every chunk: somebody asks it
    assert r.corrupt_dropped == r.corrupt_met
    assert r.corrupt_bytes_kept == 0


def test_killed_agents_leave_the_others_to_finish(
    tmp_path: Path, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleetbench, "PROCS", 2)
    store, manifest, digest, sha = image
    r = run_case(tmp_path / "run", store, manifest, digest, sha, Case("peers", 6, True, killed=0.34), B, B)
    assert r.failed == []
    assert r.bad_targets == 0
    assert len(r.times) == 4  # 2 of 6 killed halfway: the survivors' times only


def test_a_peer_claiming_every_chunk_and_serving_none_does_not_stall_the_others(
    tmp_path: Path, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    # its claims count for its own share's chunks only, until an agent vouches for it (nobody
    # does): the others pace their shares and see the swarm move; before, they all waited out
    # `patience` and went to the origin as stalled. Its own share's chunks wait for its claim to run
    # out (10 s) and pass on (5 s): patience 45 s leaves that a margin on a loaded machine
    monkeypatch.setattr(fleetbench, "PROCS", 2)
    monkeypatch.setenv("PATIENCE", "45")  # the spawned workers read it
    store, manifest, digest, sha = image
    case = Case("peers", 6, True, corrupt=True, silent=True)
    r = run_case(tmp_path / "run", store, manifest, digest, sha, case, B, B)
    assert r.failed == [] and r.bad_targets == 0 and len(r.times) == 5
    assert r.drops.get("to origin: stalled", 0) == 0, r.drops
    assert r.origin_bytes <= 2 * SIZE, f"origin sent {r.origin_bytes / SIZE:.2f} S, expected about 1"
    assert r.corrupt_bytes_kept == 0
