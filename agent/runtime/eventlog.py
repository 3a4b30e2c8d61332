"""A job's events on their way to the controller: bounded, numbered only when sent.

Events wait unnumbered in a bounded queue; a batch gets its sequence numbers when
it is first sent and keeps them until the controller acknowledges it, so a
retried post is the same post (the controller skips what it already has) and the
numbering never has a gap. When the controller is away and the queue is full,
progress events go first (the next one supersedes them), then the oldest others.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from agent import protocol as p


@dataclass(frozen=True)
class Pending:
    kind: p.EventKind
    message: str
    at: float
    done: int | None = None
    total: int | None = None


class EventLog:
    def __init__(self, job_id: str, attempt: int, next_seq: int, limit: int = 10000) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.next_seq = next_seq
        self.limit = limit
        self.dropped = 0
        self._queue: collections.deque[Pending] = collections.deque()
        self._in_flight: tuple[p.Event, ...] = ()
        self._lock = threading.Lock()

    def add(self, kind: p.EventKind, message: str, done: int | None = None, total: int | None = None) -> None:
        with self._lock:
            if kind is p.EventKind.PROGRESS and self._queue and self._queue[-1].kind is p.EventKind.PROGRESS:
                self._queue.pop()  # superseded before it was sent
            self._queue.append(Pending(kind, message[:4000], time.time(), done, total))
            while len(self._queue) > self.limit:
                self._drop_one()

    def _drop_one(self) -> None:
        for i, event in enumerate(self._queue):
            if event.kind is p.EventKind.PROGRESS:
                del self._queue[i]
                break
        else:
            self._queue.popleft()
        self.dropped += 1

    def batch(self, max_events: int = p.MAX_EVENTS_PER_POST) -> p.EventBatch | None:
        """The batch to send now: the unacknowledged one again, or the next one numbered."""
        with self._lock:
            if not self._in_flight:
                taken = [self._queue.popleft() for _ in range(min(max_events, len(self._queue)))]
                self._in_flight = tuple(
                    p.Event(self.next_seq + i, e.at, e.kind, e.message, e.done, e.total)
                    for i, e in enumerate(taken)
                )
                self.next_seq += len(taken)
            if not self._in_flight:
                return None
            return p.EventBatch(self.attempt, self._in_flight)

    def acknowledge(self, ack: p.EventAck) -> None:
        with self._lock:
            # keep whatever the controller has not yet acknowledged (normally nothing)
            self._in_flight = tuple(e for e in self._in_flight if e.seq >= ack.next_seq)

    def empty(self) -> bool:
        with self._lock:
            return not self._queue and not self._in_flight
