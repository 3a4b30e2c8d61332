"""What a normal transfer runs at, here and now: the median of the last few (bytes/s).

Peers are judged slow against it rather than against a fixed floor alone: a fixed floor that fits
a 1 Gbit/s rack (64 KiB/s) let a peer at a tenth of its swarm's rate hold a fetch slot for the ten
times as long, and one that fits the fast swarm drops every peer of a slow one.
"""

from __future__ import annotations

import statistics
import threading
from collections import OrderedDict, deque

SLOWER = 4.0  # a transfer below a quarter of the median is slow


class Rates:
    def __init__(self, keep: int = 16, least: int = 4) -> None:
        self.recent: deque[float] = deque(maxlen=keep)
        self.least = least
        self.lock = threading.Lock()

    def add(self, rate: float) -> None:
        if rate > 0:
            with self.lock:
                self.recent.append(rate)

    def expected(self) -> float | None:
        """The median of the recent rates, once there are `least` of them."""
        with self.lock:
            if len(self.recent) < self.least:
                return None
            return statistics.median(self.recent)

    def slow(self, rate: float) -> bool:
        expected = self.expected()
        return expected is not None and rate < expected / SLOWER


class Callers:
    """The last upload rate to each caller (by the holder its ticket names), bounded."""

    def __init__(self, most: int = 4096) -> None:
        self.most = most
        self.last: OrderedDict[str, float] = OrderedDict()
        self.lock = threading.Lock()

    def note(self, holder: str, rate: float) -> None:
        with self.lock:
            self.last[holder] = rate
            self.last.move_to_end(holder)
            while len(self.last) > self.most:
                self.last.popitem(last=False)

    def rate(self, holder: str) -> float | None:
        with self.lock:
            return self.last.get(holder)
