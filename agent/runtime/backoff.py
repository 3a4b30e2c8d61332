"""Exponential backoff with full jitter: sleep uniform(0, min(cap, base * 2**attempt)).

Full jitter spreads a thousand agents that lost the same controller over the
whole window, so they do not come back in lockstep when it returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 60.0
    attempt: int = 0
    rng: random.Random | None = None

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return (self.rng or random).uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
