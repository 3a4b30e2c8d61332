"""Source health (agent/writer/health.py) as a table: outcomes in, order and eligibility out, with
the clock given by the test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.writer.health import Attempt, Change, Health, HealthPolicy, Outcome, State, Wait

POLICY = HealthPolicy(demote_after=3, probe_after=1.0, probe_max=8.0, max_bad=2, sample_every=5.0)
MiB = 1 << 20


def table(*names: str, policy: HealthPolicy = POLICY) -> Health:
    h = Health(policy)
    for n in names:
        h.add(n)
    return h


def take(h: Health, now: float, tried: tuple[str, ...] = (), avoid: tuple[str, ...] = ()) -> Attempt:
    pick = h.take(now, set(tried), set(avoid))
    assert isinstance(pick, Attempt), pick
    return pick


def run(h: Health, name: str, start: float, end: float, outcome: Outcome, size: int = MiB) -> Change | None:
    """One request to `name` from `start` to `end` (its slot taken and given back)."""
    h.records[name].in_flight += 1
    return h.end(Attempt(name, start, False), outcome, end, size, f"{outcome.value} at {end}")


@dataclass(frozen=True)
class Case:
    name: str
    outcomes: tuple[Outcome, ...]  # sequential requests to "a", one second apart
    state: State
    first: str  # who a fresh take() asks at t = 100 (a's probe is due by then unless dropped)
    # (the cases with a's first answer still to come ask a first too: an unproven source is tried)


CASES = [
    Case("a blip does not demote", (Outcome.FAILED,), State.SUSPECT, "a"),
    Case("two stalls: still suspect", (Outcome.SLOW, Outcome.SLOW), State.SUSPECT, "a"),
    Case("three failures demote", (Outcome.FAILED, Outcome.SLOW, Outcome.FAILED), State.DEMOTED, "a"),
    Case(
        "a success in between resets",
        (Outcome.FAILED, Outcome.FAILED, Outcome.OK, Outcome.FAILED),
        State.SUSPECT,
        "a",
    ),
    Case("404s say nothing", (Outcome.MISSING,) * 5, State.HEALTHY, "a"),
    Case("cancelled says nothing", (Outcome.CANCELLED,) * 5, State.HEALTHY, "a"),
    Case("bad bytes drop at max_bad", (Outcome.BAD, Outcome.BAD), State.DROPPED, "b"),
    Case("restored by one good answer", (Outcome.FAILED,) * 4 + (Outcome.OK,), State.HEALTHY, "a"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outcomes_to_state_and_order(case: Case) -> None:
    h = table("a", "b")
    run(h, "b", 0.0, 0.01, Outcome.OK)  # b has answered once: only a's record decides
    for i, outcome in enumerate(case.outcomes):
        run(h, "a", float(i), float(i) + 0.5, outcome)
    assert h.state("a") is case.state
    assert take(h, 100.0).name == case.first


def test_unproven_sources_get_one_request_each_until_they_answer() -> None:
    h = table("a", "b")
    first, second = take(h, 0.0), take(h, 0.0)
    assert (first.name, second.name) == ("a", "b")
    assert h.take(0.0, set()) == Wait(None)  # the other threads wait for a first answer
    h.end(second, Outcome.OK, 0.01, MiB)
    assert [take(h, 0.01).name for _ in range(3)] == ["b"] * 3  # a still holds its one request
    h.end(first, Outcome.OK, 0.02, MiB)
    assert take(h, 0.02).name == "a"  # proven: first again, in the configured order


def test_concurrent_failures_of_one_episode_count_once() -> None:
    h = table("a", "b")
    run(h, "a", 0.0, 0.01, Outcome.OK)
    run(h, "b", 0.0, 0.01, Outcome.OK)
    slots = [take(h, 1.0) for _ in range(4)]  # four threads ask the healthy origin at once
    assert {s.name for s in slots} == {"a"}
    for s in slots:  # a restart resets all four connections
        h.end(s, Outcome.FAILED, 1.1, reason="reset")
    assert h.state("a") is State.SUSPECT and h.records["a"].failures == 1


def test_a_suspect_gets_one_request_at_a_time_and_the_others_go_elsewhere() -> None:
    h = table("a", "b")
    run(h, "b", 0.0, 0.01, Outcome.OK)
    run(h, "a", 0.0, 10.0, Outcome.SLOW)
    probe = take(h, 10.0)
    assert probe == Attempt("a", 10.0, True, POLICY.probe_floor)  # b can serve: the try is bounded
    assert [take(h, 10.0).name for _ in range(3)] == ["b", "b", "b"]


def test_alone_and_busy_a_suspect_makes_the_others_wait_not_fail() -> None:
    h = table("a")
    run(h, "a", 0.0, 1.0, Outcome.FAILED)
    take(h, 1.0)  # the probe
    assert h.take(1.0, set()) == Wait(None)  # until the probe ends
    assert h.take(1.0, {"a"}) is None  # a chunk that already failed here ends its round instead


def test_a_busy_source_is_waited_for_not_counted_as_a_failed_round() -> None:
    h = table("liar", "good")
    first, second = take(h, 0.0), take(h, 0.0)  # both unproven, one request each
    h.end(first, Outcome.BAD, 0.01, reason="blake3 mismatch")
    assert h.take(0.01, {"liar"}) == Wait(None)  # good's first answer is coming: wait for it
    h.end(second, Outcome.OK, 0.02, MiB)
    assert take(h, 0.02, ("liar",)).name == "good"


def test_demoted_sources_are_probed_with_doubling_backoff_up_to_the_cap() -> None:
    h = table("a", "b")
    t = 0.0
    for _ in range(3):
        run(h, "a", t, t + 1, Outcome.SLOW)
        t += 1
    assert h.state("a") is State.DEMOTED
    gaps = []
    for _ in range(6):
        wait = h.take(t, {"b"})  # b tried already: only a is left
        assert isinstance(wait, Wait) or wait is None
        due = h.records["a"].next_try
        gaps.append(due - t)
        probe = take(h, due)
        assert probe.name == "a" and probe.probe
        h.end(probe, Outcome.FAILED, due, reason="still down")
        t = due
    assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_demotion_and_restore_are_reported_once() -> None:
    h = table("a", "b")
    changes = [run(h, "a", float(i), float(i) + 0.5, Outcome.FAILED) for i in range(5)]
    assert [c.state if c else None for c in changes] == [None, None, State.DEMOTED, None, None]
    assert changes[2] is not None and "3 failures in a row" in changes[2].reason
    restored = run(h, "a", 50.0, 50.1, Outcome.OK)
    assert restored is not None and restored.state is State.HEALTHY and restored.name == "a"


def test_retry_after_holds_a_suspect_back() -> None:
    h = table("a", "b")
    h.records["a"].in_flight += 1
    h.end(Attempt("a", 0.0, False), Outcome.FAILED, 1.0, reason="503", retry_after=30.0)
    assert take(h, 2.0).name == "b"
    assert take(h, 31.0).name == "a"


def test_the_faster_healthy_source_goes_first_and_the_slow_one_is_sampled() -> None:
    h = table("slow", "fast")
    run(h, "fast", 0.0, 0.1, Outcome.OK, 10 * MiB)  # 100 MiB/s
    for i in range(POLICY.min_samples):
        run(h, "slow", float(i), i + 1.0, Outcome.OK, 10 * MiB)  # 10 MiB/s
    assert [take(h, 4.0).name for _ in range(3)] == ["fast"] * 3
    sample = take(h, 8.0)  # sample_every after its last good answer
    assert sample.name == "slow" and sample.probe
    assert take(h, 8.0).name == "fast"  # one sample at a time
    h.end(sample, Outcome.OK, 8.01, 10 * MiB)  # it got fast: ~1 GiB/s now, ~300 MiB/s on average
    assert take(h, 9.0).name == "slow"


def test_one_slow_first_answer_does_not_hold_a_source_back() -> None:
    h = table("origin", "mirror")
    run(h, "mirror", 0.0, 0.01, Outcome.OK, MiB)  # 100 MiB/s
    run(h, "origin", 0.0, 1.0, Outcome.OK, MiB)  # its first answer paid for a TCP handshake, say
    assert take(h, 2.0).name == "origin"  # still first, in the configured order


def test_rates_within_the_ratio_keep_the_configured_order() -> None:
    h = table("mirror", "origin")
    for i in range(POLICY.min_samples):
        run(h, "mirror", float(i), i + 1.0, Outcome.OK, 60 * MiB)
    run(h, "origin", 0.0, 1.0, Outcome.OK, 100 * MiB)
    assert take(h, 2.0).name == "mirror"


def test_a_tried_source_is_skipped_and_a_round_ends_when_all_are() -> None:
    h = table("a", "b")
    assert take(h, 0.0, ("a",)).name == "b"
    assert h.take(0.0, {"a", "b"}) is None


def test_sources_come_and_go() -> None:
    h = table("origin")
    h.add("peer")
    for i in range(POLICY.min_samples):
        run(h, "origin", i / 10, i / 10 + 0.1, Outcome.OK, MiB)
    run(h, "peer", 0.0, 0.01, Outcome.OK, MiB)
    assert take(h, 2.0).name == "peer"
    slot = take(h, 2.0)
    h.remove("peer")
    assert h.end(slot, Outcome.FAILED, 3.0) is None  # a request to a removed source ends quietly
    assert take(h, 3.0).name == "origin"


def test_a_dropped_source_is_never_asked_again() -> None:
    h = table("a", "b")
    run(h, "b", 0.0, 0.01, Outcome.OK)
    change = None
    for i in range(2):
        change = run(h, "a", float(i), float(i) + 0.1, Outcome.BAD)
    assert (
        change is not None and change.state is State.DROPPED and "2 answers with wrong bytes" in change.reason
    )
    assert h.dropped() == ["a"]
    assert all(take(h, 1000.0 + i).name == "b" for i in range(5))
    assert h.take(1000.0, {"b"}) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"demote_after": 0},
        {"max_bad": 0},
        {"probe_after": 0.0},
        {"probe_after": 10.0, "probe_max": 5.0},
        {"smoothing": 0.0},
        {"slow_ratio": 1.0},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="health policy"):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


def test_a_source_that_failed_this_chunk_comes_last_and_only_if_nothing_else_is_left() -> None:
    h = table("mirror", "origin")
    run(h, "mirror", 0.0, 0.01, Outcome.FAILED)  # a suspect, due again at once
    run(h, "origin", 0.0, 0.01, Outcome.OK)
    assert take(h, 1.0, avoid=("mirror",)).name == "origin"  # not the mirror's probe, for this chunk
    busy = take(h, 1.0)  # another thread: the mirror's probe
    assert busy.name == "mirror"
    h.end(busy, Outcome.FAILED, 1.1)
    alone = table("origin")
    run(alone, "origin", 0.0, 0.01, Outcome.FAILED)
    assert take(alone, 1.0, avoid=("origin",)).name == "origin"  # the only one: asked again


def test_tries_under_suspicion_are_bounded_only_while_another_source_can_serve() -> None:
    policy = POLICY
    alone = table("origin")
    assert take(alone, 0.0).budget is None  # nobody to fall back on: its own timeouts
    h = table("mirror", "origin")
    first = take(h, 0.0)
    assert (first.name, first.budget) == ("mirror", policy.first_budget)  # a first try, others exist
    second = take(h, 0.0)
    h.end(second, Outcome.OK, 0.01, MiB)  # the origin: 100 MiB/s
    h.end(first, Outcome.SLOW, 2.0, reason="cut")
    probe = h.take(2.0, set(), size=64 * MiB)
    assert isinstance(probe, Attempt) and probe.name == "mirror"
    assert probe.budget == pytest.approx(policy.probe_factor * 0.64)  # 8x the origin's 0.64 s
    small = h.take(2.0, set(), size=MiB)
    assert (
        isinstance(small, Attempt) and small.name == "origin" and small.budget is None
    )  # healthy: unbounded
    h.end(probe, Outcome.SLOW, 3.0, reason="cut")
    h.end(small, Outcome.FAILED, 3.0, reason="down")  # now nobody is healthy to fall back on
    again = take(h, 3.0)
    assert again.probe and again.budget is None


def test_a_pool_of_peers_is_asked_first_by_every_thread_and_never_counted() -> None:
    h = Health(POLICY)
    h.add("peers", pool=True)
    h.add("origin")
    slots = [take(h, 0.0) for _ in range(4)]  # unproven, yet every thread asks the pool
    assert [s.name for s in slots] == ["peers"] * 4 and all(s.budget is None for s in slots)
    for s in slots:  # no peer had these chunks (or the pool dropped a peer): nothing is held against it
        h.end(s, Outcome.FAILED, 1.0, reason="no peer has it")
    assert h.state("peers") is State.HEALTHY and h.records["peers"].failures == 0
    assert take(h, 1.0, tried=("peers",)).name == "origin"  # the chunk goes on to the next source
    assert take(h, 1.0).name == "peers"  # the next chunk asks the pool first again
    # the origin's first try is not cut short because of the pool: the pool may not serve it
    assert h._budget(h.records["origin"], MiB) is None
