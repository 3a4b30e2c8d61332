"""Source health: which chunk source to ask next, from what each one answered before.

Pure: no I/O, no locks, no clock of its own (every call takes `now`), so the policy is
table-tested (tests/unit/test_source_health.py); fetch.SourceSet holds the lock, reads the
clock and emits the events. Generic over sources: a record is keyed by a name (a mirror's
URL, the origin, an agent peer), and sources come and go at run time.

A source is
- unproven until it first serves a chunk: one request at a time, so that at the start a dead
  first source holds one thread, not all of them, while the others try the next source;
- healthy: asked by every thread, in the configured order, except that one measurably slower
  than the fastest healthy source (below `slow_ratio` of its rate) goes behind the others and
  is only sampled now and then, so a slow mirror does not hold the write;
- suspect after a failure (stall, trickle, refused, reset, 5xx, bad bytes): at most one
  request in flight to it, so concurrent threads do not all wait out the same stall, and
  that probe goes first so the source is restored (one success) or demoted quickly;
- demoted after `demote_after` failures in a row: probed once per backoff (doubling up to
  `probe_max`), restored by one good answer;
- dropped after `max_bad` answers with wrong bytes: never asked again.
A try of an unproven, suspect or held-back source gets a time budget while a proven healthy
source is there to fall back on: a few times what the fastest one takes for the chunk (at
least `probe_floor`), or `first_budget` for a first request before anyone has answered. A dead
mirror then costs one thread a couple of seconds, not a stall timeout per try.
Failures of requests that were already in flight when a failure was counted belong to the
same episode and are not counted again: a server restart that resets four connections at
once is one blip, not four, and a single blip does not demote a good origin. A 404 says
nothing about health (a mirror may lack a chunk the origin has).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    OK = "ok"
    SLOW = "slow"  # stalled or trickled past its deadline
    FAILED = "failed"  # refused, reset, 5xx, a body cut short
    MISSING = "missing"  # 404/410: not held against the source
    BAD = "bad"  # wrong bytes (length or digest): counts toward a drop
    CANCELLED = "cancelled"  # the job was cancelled: says nothing about the source


class State(enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DEMOTED = "demoted"
    DROPPED = "dropped"


@dataclass(frozen=True)
class HealthPolicy:
    demote_after: int = 3  # failures in a row (separate episodes) before a source is demoted
    probe_after: float = 1.0  # seconds from a demotion to the first probe
    probe_max: float = 60.0  # the longest wait between probes (doubling from probe_after)
    max_bad: int = 3  # answers with wrong bytes before a source is dropped for the job
    slow_ratio: float = 0.5  # a healthy source below this share of the fastest one's rate goes behind
    sample_every: float = 5.0  # seconds between samples of a source held back as slow
    min_samples: int = 3  # good answers before a source may be held back as slow (one can be noise)
    smoothing: float = 0.3  # weight of the newest rate in the moving average
    probe_factor: float = 8.0  # a probe may take this many times what the fastest source takes
    probe_floor: float = 0.5  # ... and at least this many seconds
    first_budget: float = 2.0  # seconds for a first request while another source might serve

    def __post_init__(self) -> None:
        if self.demote_after < 1:
            raise ValueError(f"health policy: demote_after must be >= 1, got {self.demote_after}")
        if self.max_bad < 1:
            raise ValueError(f"health policy: max_bad must be >= 1, got {self.max_bad}")
        if not 0 < self.probe_after <= self.probe_max:
            raise ValueError(
                "health policy: expected 0 < probe_after <= probe_max, "
                f"got {self.probe_after}, {self.probe_max}"
            )
        if not self.probe_factor >= 1 or not self.probe_floor > 0 or not self.first_budget > 0:
            raise ValueError(
                "health policy: expected probe_factor >= 1, probe_floor > 0 and first_budget > 0, "
                f"got {self.probe_factor}, {self.probe_floor}, {self.first_budget}"
            )
        if not 0 < self.smoothing <= 1 or not 0 <= self.slow_ratio < 1:
            raise ValueError(
                f"health policy: expected 0 < smoothing <= 1 and 0 <= slow_ratio < 1, "
                f"got {self.smoothing}, {self.slow_ratio}"
            )

    def backoff(self, failures: int) -> float:
        """Seconds from the last counted failure to the next try of a source with `failures` in a row."""
        if failures < self.demote_after:
            return 0.0  # suspect: tried again at once, one request at a time
        return min(self.probe_max, self.probe_after * 2.0 ** (failures - self.demote_after))


@dataclass
class Record:
    name: str
    failures: int = 0  # counted failures in a row
    bad: int = 0  # answers with wrong bytes, in all
    rate: float | None = None  # stored bytes/s, moving average of good answers
    samples: int = 0  # good answers the rate is made of
    in_flight: int = 0
    next_try: float = 0.0  # a suspect or demoted source is not asked before this
    episode: float = -math.inf  # when the last failure was counted
    last_ok: float = -math.inf
    proven: bool = False  # has served a chunk in this job
    reason: str = ""  # the last failure
    dropped: bool = False
    # a pool of sources that keeps their health itself (the agent's peers, agent.peer): asked
    # first by every thread, never held back or cut short; a chunk it cannot serve goes to the
    # next source without counting against it (it drops a bad peer itself, not the pool)
    pool: bool = False

    def state(self, policy: HealthPolicy) -> State:
        if self.dropped:
            return State.DROPPED
        if self.failures >= policy.demote_after:
            return State.DEMOTED
        return State.SUSPECT if self.failures else State.HEALTHY


@dataclass(frozen=True)
class Attempt:
    """A request slot taken: give it back with Health.end (or release)."""

    name: str
    started: float
    probe: bool  # a try of a suspect, demoted or held-back source
    budget: float | None = None  # seconds the request may take, if shorter than the source's own


@dataclass(frozen=True)
class Wait:
    """Nothing may be asked now, but something may be soon: wait at most `seconds`
    (None: until a request in flight ends)."""

    seconds: float | None


@dataclass(frozen=True)
class Change:
    """A source's health changed in a way worth an event."""

    name: str
    state: State  # DEMOTED, HEALTHY (restored) or DROPPED
    reason: str


@dataclass
class Health:
    policy: HealthPolicy
    records: dict[str, Record] = field(default_factory=dict)  # in the configured order

    def add(self, name: str, pool: bool = False) -> None:
        self.records.setdefault(name, Record(name, pool=pool))

    def remove(self, name: str) -> None:
        self.records.pop(name, None)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records.values())

    def dropped(self) -> list[str]:
        return [r.name for r in self if r.dropped]

    def state(self, name: str) -> State:
        return self.records[name].state(self.policy)

    def take(
        self, now: float, tried: Collection[str], avoid: Collection[str] = (), size: int = 0
    ) -> Attempt | Wait | None:
        """The source to ask next for a chunk that `tried` already failed in this round, its
        slot taken; Wait if a candidate is busy (one request at a time), or backing off and none
        was tried yet; None when the round is over (every candidate tried, or the rest backing
        off). Sources in
        `avoid` (they failed this chunk in an earlier round) come last, and only when no other
        source is left to wait for."""
        candidates = [r for r in self if not r.dropped and r.name not in tried]
        if not candidates:
            return None
        fastest = max((r.rate for r in self if not r.dropped and not r.failures and r.rate), default=0.0)
        pools = [r for r in candidates if r.pool and r.name not in avoid]
        if pools:
            pools[0].in_flight += 1
            return Attempt(pools[0].name, now, False, None)
        candidates = [r for r in candidates if not r.pool]
        if not candidates:
            return None
        probes: list[Record] = []
        primaries: list[Record] = []
        backups: list[Record] = []
        last: list[Record] = []
        waits: list[float | None] = []
        avoided: list[float | None] = []
        for r in candidates:
            free = r.in_flight == 0
            if r.failures:
                ready, wait = free and now >= r.next_try, r.next_try - now if free else None
            else:
                ready, wait = free or r.proven, None  # unproven: one request at a time
            if not ready:
                (avoided if r.name in avoid else waits).append(wait)
            elif r.name in avoid:
                last.append(r)
            elif r.failures or not r.proven:  # a suspect's try, or a first answer (its rate)
                probes.append(r)
            elif r.samples >= self.policy.min_samples and (r.rate or 0.0) < self.policy.slow_ratio * fastest:
                (probes if free and now >= r.last_ok + self.policy.sample_every else backups).append(r)
            else:
                primaries.append(r)
        backups.sort(key=lambda r: -(r.rate or 0.0))
        for group in (probes, primaries, backups) + (() if waits else (last,)):
            if group:
                chosen = group[0]
                chosen.in_flight += 1
                probe = group is probes or chosen.failures > 0
                return Attempt(chosen.name, now, probe, self._budget(chosen, size) if probe else None)
        if None in waits:
            return Wait(None)  # a request in flight ends soon (its own budget or timeouts): not a failure
        if tried:
            return None  # the rest back off: the round's failures go through its backoff first
        timed = [w for w in waits + avoided if w is not None]
        return Wait(max(0.0, min(timed)) if timed else None)

    def _budget(self, r: Record, size: int) -> float | None:
        """How long a try of `r` may take: bounded only while another source can serve instead."""
        others = [o for o in self if o is not r and not o.dropped and not o.pool]
        rates = [o.rate for o in others if o.proven and not o.failures and o.rate]
        if rates:
            return max(self.policy.probe_floor, self.policy.probe_factor * size / max(rates))
        if not r.proven and not r.failures and others:  # its very first try; the next ones wait fully
            return self.policy.first_budget
        return None

    def end(
        self,
        attempt: Attempt,
        outcome: Outcome,
        now: float,
        size: int = 0,
        reason: str = "",
        retry_after: float | None = None,
    ) -> Change | None:
        """Record how an attempt ended; returns the change worth an event, if any."""
        r = self.records.get(attempt.name)
        if r is None:  # removed while the request was in flight
            return None
        r.in_flight = max(0, r.in_flight - 1)
        if r.pool or outcome is Outcome.CANCELLED or outcome is Outcome.MISSING:
            return None
        if outcome is Outcome.OK:
            seconds = now - attempt.started
            if size and seconds > 0:
                rate = size / seconds
                a = self.policy.smoothing
                r.rate = rate if r.rate is None else a * rate + (1 - a) * r.rate
                r.samples += 1
            restored = r.state(self.policy) is State.DEMOTED
            r.failures, r.next_try, r.last_ok, r.proven = 0, 0.0, now, True
            return Change(r.name, State.HEALTHY, f"answered again after: {r.reason}") if restored else None
        if r.dropped:
            return None
        change: Change | None = None
        if outcome is Outcome.BAD:
            r.bad += 1
            if r.bad >= self.policy.max_bad:
                r.dropped, r.reason = True, reason
                return Change(r.name, State.DROPPED, f"{r.bad} answers with wrong bytes, the last: {reason}")
        if attempt.started < r.episode:
            return None  # in flight when a failure was counted: the same episode
        before = r.state(self.policy)
        r.failures += 1
        r.episode, r.reason = now, reason
        r.next_try = now + self.policy.backoff(r.failures)
        if retry_after is not None:
            r.next_try = max(r.next_try, now + retry_after)
        if before is not State.DEMOTED and r.state(self.policy) is State.DEMOTED:
            change = Change(r.name, State.DEMOTED, f"{r.failures} failures in a row, the last: {reason}")
        return change
