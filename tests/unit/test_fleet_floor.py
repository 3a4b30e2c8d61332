"""The store-and-forward floor printed beside section G's figures (scripts/benchlib/fleetfloor.py), and how
the section spreads its agents over worker processes (scripts/benchlib/fleetbench.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib.fleetfloor import floor, floor_ticks, rank


def test_one_piece_spreads_by_doubling_plus_the_origin() -> None:
    # one piece, origin feeding 1: holders after t ticks 1, 3, 7, 15: 8 agents need 4 ticks
    assert floor_ticks(8, 8, 1, 1) == 4
    assert floor_ticks(7, 7, 1, 1) == 3
    # an origin feeding everyone at once: no wait at all
    assert floor_ticks(10, 10, 16, 10) == 16


def test_the_wait_for_a_first_piece_is_paid_once_per_agent_not_per_piece() -> None:
    # the bench's shape: 16 pieces, origin at 4 B
    assert floor(25, 0.5, 16, 4) == pytest.approx(18 / 16)  # the 13th holder: tick 3
    assert floor(200, 0.5, 16, 4) == pytest.approx(20 / 16)  # the 101st: tick 5
    assert floor(200, 0.99, 16, 4) == pytest.approx(21 / 16)  # the 198th: tick 6
    # more pieces, the same S/B: the same ticks weigh less
    assert floor(200, 0.5, 64, 4) == pytest.approx(68 / 64)


def test_the_idle_ticks_bound_rules_when_the_origin_is_slow() -> None:
    # origin at B/2, 3 agents, 1 piece: ticks receive 0.5, 1, 2 agents -> idle 2.5 + 2 + 1 = 5.5;
    # mean completion 1 + 5.5/3 = 2.83 ticks, above the first-piece bound (holders 0.5, 1.5, 3.5: tick 3 -> 3)
    assert floor_ticks(3, 3, 1, 0.5) == pytest.approx(3)
    assert floor_ticks(4, 4, 1, 0.5) == pytest.approx(max(4, 1 + (3.5 + 3 + 2 + 0) / 4))


def test_the_rank_is_the_bench_percentile_s() -> None:
    ranks = [rank(25, 0.5), rank(25, 0.99), rank(200, 0.5), rank(200, 0.99), rank(1, 0.5)]
    assert ranks == [13, 25, 101, 198, 1]


def test_nonsense_is_refused_with_its_values() -> None:
    with pytest.raises(ValueError, match="got n=3 m=4 k=16 c=4"):
        floor_ticks(3, 4, 16, 4)


def test_the_fleet_bench_runs_a_worker_per_core_and_one_per_thirteen_agents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchlib import fleetbench

    monkeypatch.setattr(fleetbench, "PROCS", 0)
    # one per core at least, then one per AGENTS_PER_PROC agents
    assert fleetbench.worker_count(25, cores=2) == 2
    assert fleetbench.worker_count(25, cores=4) == 4
    assert fleetbench.worker_count(200, cores=2) == 16
    assert fleetbench.worker_count(201, cores=2) == 16
    assert fleetbench.worker_count(209, cores=2) == 17
    # never more workers than agents
    assert fleetbench.worker_count(1, cores=8) == 1
    # PROCS fixes the count (development), still at most one per agent
    monkeypatch.setattr(fleetbench, "PROCS", 3)
    assert fleetbench.worker_count(200, cores=2) == 3
    assert fleetbench.worker_count(2, cores=2) == 2
