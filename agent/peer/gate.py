"""Who gets a peer server's upload slot: the caller that holds the fewest chunks, not the one that
asks first.

Copies of an image spread fastest when every holder's upload goes to an agent that holds nothing
yet: each such upload adds an uploader, and the holders double every chunk time (the binomial
pipeline, benchlib/fleetfloor.py). With first-come slots and 503 for the rest, a young swarm's few
uploads went to whoever polled first, mostly agents that already held chunks: in section G at
N = 50 the holders grew by ~1.3x a chunk time instead of 2x, and the agents served last started
12-15 s late and finished 10 s after the first.

So a request that finds the slots full waits, in a short queue, for the next free slot (at most
`wait` seconds: a caller's socket timeout must be longer), and a free slot goes to the waiter that
holds the fewest chunks (the earliest among equals). A full queue turns away its neediest-last:
the caller that holds the most, which gets 503 as before. The count is the caller's own word (a
header): a fleet member that lies takes uploads ahead of others, which it could do by asking more
often anyway; outsiders have no ticket and never get here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Waiter:
    held: int
    seq: int
    granted: bool = False
    turned_away: bool = False


class UploadGate:
    def __init__(
        self,
        slots: int,
        queue: int,
        wait: float,
        below: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1 or queue < 0 or wait < 0:
            raise ValueError(
                f"upload gate: expected slots >= 1, queue >= 0, wait >= 0, got {slots}, {queue}, {wait}"
            )
        self.slots, self.queue, self.wait, self.below = slots, queue, wait, below
        self.clock = clock
        self.cond = threading.Condition()
        self.active = 0
        self.waiters: list[_Waiter] = []
        self.seq = 0

    def enter(self, held: int, may_wait: bool = True) -> bool:
        """Take a slot for a caller holding `held` chunks, waiting in the queue if need be; False:
        turned away (queue full of needier callers, or no slot within `wait`): answer 503. Only a
        caller that holds fewer than `below` chunks waits (one that holds some has chunks to serve
        and other peers to ask), and only if `may_wait` (not one known to read slowly: it would hold
        the slot for many times a chunk's time)."""
        with self.cond:
            if self.active < self.slots and not self.waiters:
                self.active += 1
                return True
            if held >= self.below or not may_wait:
                return False
            self.seq += 1
            me = _Waiter(held, self.seq)
            if len(self.waiters) >= self.queue:
                last = max(self.waiters, key=_rank, default=None)
                if last is None or _rank(me) >= _rank(last):
                    return False
                last.turned_away = True
                self.waiters.remove(last)
                self.cond.notify_all()
            self.waiters.append(me)
            deadline = self.clock() + self.wait
            while not me.granted and not me.turned_away:
                left = deadline - self.clock()
                if left <= 0:
                    self.waiters.remove(me)
                    return False
                self.cond.wait(left)
            return me.granted

    def leave(self) -> None:
        """Give the slot back: to the neediest waiter, if any."""
        with self.cond:
            if self.waiters:
                best = min(self.waiters, key=_rank)
                self.waiters.remove(best)
                best.granted = True  # the slot passes straight to it: `active` stays
                self.cond.notify_all()
            else:
                self.active = max(0, self.active - 1)


def _rank(w: _Waiter) -> tuple[int, int]:
    return (w.held, w.seq)
