"""A token bucket: bytes per second with a burst, shared by threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """take(n) blocks until n bytes fit under `rate` (bytes/s); rate 0 means no cap."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 8, 64 << 10)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()
        self.lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Take n tokens now (into debt if need be); the seconds until they would have been there."""
        if self.rate <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def take(self, n: int, stop: threading.Event | None = None) -> bool:
        """Wait for n tokens (may go into debt for n > burst); False if `stop` was set meanwhile."""
        wait = self.reserve(n)
        if wait > 0:
            if stop is not None:
                return not stop.wait(wait)
            time.sleep(wait)
        return True
