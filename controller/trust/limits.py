"""Failed enrollments counted per key (a MAC, an address) in a sliding window.

In memory on purpose: it slows down guessing and hammering, it is not a record, and a restart
forgetting it costs an attacker nothing it could not get by waiting out the window. The number of
keys is bounded so a flood of made-up MACs cannot grow it without end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    failures: int  # allowed within `window` seconds; one more is refused until the oldest ages out
    window: float


@dataclass(frozen=True)
class Blocked:
    key: str
    failures: int
    retry_after: float  # seconds until one failure ages out


class FailureLimiter:
    def __init__(self, limits: dict[str, Limit], clock: Callable[[], float], max_keys: int = 65536) -> None:
        self.limits = limits  # by kind: "mac", "address"
        self.clock = clock
        self.max_keys = max_keys
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, kind: str, key: str, now: float) -> deque[float]:
        window = self.limits[kind].window
        times = self._failures.get((kind, key))
        if times is None:
            return deque()
        while times and times[0] <= now - window:
            times.popleft()
        if not times:
            del self._failures[(kind, key)]
        return times

    def blocked(self, keys: Iterable[tuple[str, str]]) -> Blocked | None:
        """The first (kind, key) that has used up its failures, if any."""
        now = self.clock()
        for kind, key in keys:
            times = self._recent(kind, key, now)
            limit = self.limits[kind]
            if len(times) >= limit.failures:
                return Blocked(f"{kind} {key}", len(times), times[0] + limit.window - now)
        return None

    def fail(self, keys: Iterable[tuple[str, str]]) -> None:
        now = self.clock()
        for kind, key in keys:
            self._recent(kind, key, now)
            times = self._failures.setdefault((kind, key), deque())
            times.append(now)
            if len(times) > self.limits[kind].failures:
                times.popleft()  # more than the limit is never needed to decide
        while len(self._failures) > self.max_keys:
            del self._failures[next(iter(self._failures))]  # the oldest key first
