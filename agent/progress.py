"""A terminal progress bar, drawn only on a terminal, throttled."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    def __init__(self, total: int, label: str, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or done >= self.total):
            self._last = now
            self._draw(now, extra)

    def _draw(self, now: float, extra: str) -> None:
        frac = min(self.done / self.total, 1.0)
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (
            f"\r{self.label} [{bar}] {frac * 100:5.1f}% {human_bytes(self.done)}/"
            f"{human_bytes(self.total)} {human_bytes(rate)}/s ETA {eta:4.0f}s {extra}"
        )
        self.stream.write(line[:160])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
