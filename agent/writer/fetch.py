"""Getting one chunk's verified bytes from a set of sources, with retries and failover.

Per chunk: ask the source that source health (health.py) puts first; a failure moves on to
the next one. After a round where all failed, back off (with jitter) and go round again, up
to `retries` rounds. Health decides the order and who may be asked at all: a source that
stalls, trickles or fails is asked by one thread at a time, demoted after a few failures
and probed later; one that serves wrong bytes (digest mismatch, wrong length) `max_bad`
times is dropped for the rest of the job; a 404 is not held against a source. Nothing
reaches the caller unverified.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.image.chunk import ChunkInvalid, Decoder, verify_raw
from agent.image.manifest import Chunk
from agent.writer.errors import Cancelled, ChunkUnavailable, FetchError
from agent.writer.events import SourceEvent, SourceFailed, SourceHealthChanged
from agent.writer.health import Attempt, Health, HealthPolicy, Outcome, State, Wait
from agent.writer.sources import BoundedSource, ChunkSource

WAIT_SLICE = 0.25  # seconds a thread waiting for a busy source sleeps before looking at cancel again


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # rounds over all sources
    backoff: float = 0.2  # seconds before the second round; x4 each round after
    max_bad: int = 3  # bad-byte answers before a source is dropped (overrides health.max_bad)
    max_backoff: float = 10.0  # the longest wait between rounds
    max_retry_after: float = 60.0  # the longest a server's Retry-After (429/503) is honoured
    health: HealthPolicy = field(default_factory=HealthPolicy)

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ValueError(
                f"retry policy: retries (rounds over the sources) must be >= 1, got {self.retries}"
            )
        if self.max_bad < 1:
            raise ValueError(f"retry policy: max_bad must be >= 1, got {self.max_bad}")

    def delay(self, round_: int, retry_after: float | None) -> float:
        """Seconds to wait before round `round_` (1-based after the first): exponential backoff
        with jitter, or the longest Retry-After a source sent in the last round if longer."""
        delay = min(self.max_backoff, self.backoff * 4 ** (round_ - 1))
        wait = random.uniform(delay / 2, delay)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def outcome_of(exc: FetchError) -> Outcome:
    if exc.bad_bytes:
        return Outcome.BAD
    if exc.missing:
        return Outcome.MISSING
    return Outcome.SLOW if exc.slow else Outcome.FAILED


class _Within:
    """A source whose fetches are cut after `budget` seconds (a try under suspicion)."""

    def __init__(self, source: ChunkSource, budget: float) -> None:
        assert isinstance(source, BoundedSource)
        self._source = source
        self._bounded: BoundedSource = source
        self.name = source.name
        self.budget = budget

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        return self._bounded.fetch_within(chunk, buf, self.budget)

    def get(self, relative: str, limit: int) -> bytes:
        return self._source.get(relative, limit)

    def interrupt(self) -> None:
        self._source.interrupt()

    def close(self) -> None:
        pass  # not ours to close


class SourceSet:
    """The job's sources under one health table; sources may be added and removed while it runs
    (agent peers come and go)."""

    def __init__(
        self,
        sources: Sequence[ChunkSource],
        policy: RetryPolicy,
        on_event: Callable[[SourceEvent], None],
        cancel: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.on_event = on_event
        self.cancel = cancel
        self.clock = clock
        self._cond = threading.Condition()
        self._sources: dict[str, ChunkSource] = {}
        self.health = Health(dataclasses.replace(policy.health, max_bad=policy.max_bad))
        self.decoder = Decoder()  # one zstd context per thread, straight into the write buffer
        for source in sources:
            self.add(source)

    @property
    def sources(self) -> list[ChunkSource]:
        with self._cond:
            return list(self._sources.values())

    @property
    def dropped(self) -> list[str]:
        with self._cond:
            return self.health.dropped()

    def add(self, source: ChunkSource) -> None:
        with self._cond:
            self._sources.setdefault(source.name, source)
            self.health.add(source.name, pool=getattr(source, "pool", False))
            self._cond.notify_all()

    def remove(self, name: str) -> ChunkSource | None:
        """Stop asking a source (requests in flight finish); the caller closes it."""
        with self._cond:
            self.health.remove(name)
            return self._sources.pop(name, None)

    def usable(self) -> list[ChunkSource]:
        with self._cond:
            return [self._sources[r.name] for r in self.health if not r.dropped]

    def state(self, name: str) -> State:
        with self._cond:
            return self.health.state(name)

    def _take(self, chunk: Chunk, tried: set[str], avoid: set[str]) -> tuple[ChunkSource, Attempt] | None:
        with self._cond:
            while True:
                if self.cancel.is_set():
                    raise Cancelled(f"cancelled while fetching {chunk.describe()}")
                pick = self.health.take(self.clock(), tried, avoid, chunk.stored_len)
                if pick is None:
                    return None
                if isinstance(pick, Attempt):
                    source = self._sources[pick.name]
                    if pick.budget is not None and isinstance(source, BoundedSource):
                        source = _Within(source, pick.budget)
                    return source, pick
                assert isinstance(pick, Wait)
                self._cond.wait(WAIT_SLICE if pick.seconds is None else min(pick.seconds, WAIT_SLICE))

    def _end(
        self,
        attempt: Attempt,
        outcome: Outcome,
        size: int = 0,
        reason: str = "",
        retry_after: float | None = None,
    ) -> tuple[SourceHealthChanged | None, bool]:
        """Record an attempt's end: the health event it causes, if any, and whether the source is
        dropped now."""
        with self._cond:
            change = self.health.end(attempt, outcome, self.clock(), size, reason, retry_after)
            dropped = attempt.name in self.health.dropped()
            self._cond.notify_all()
        if change is None:
            return None, dropped
        state = {State.DEMOTED: "demoted", State.HEALTHY: "restored"}.get(change.state, "dropped")
        return SourceHealthChanged(change.name, state, change.reason), dropped

    def fetch(
        self, chunk: Chunk, stored: memoryview, raw: memoryview, timing: dict[str, float]
    ) -> tuple[memoryview, str]:
        """Return a view of the verified raw bytes (in `stored` or `raw`) and the source's name."""
        errors: dict[str, str] = {}
        retry_after: float | None = None
        failed: set[str] = set()  # sources that failed this chunk: asked again only if no other is left
        for round_ in range(self.policy.retries):
            if round_:
                if self.cancel.wait(self.policy.delay(round_, retry_after)):
                    raise Cancelled(f"cancelled while retrying {chunk.describe()}")
                retry_after = None
            tried: set[str] = set()
            while (taken := self._take(chunk, tried, failed)) is not None:
                source, attempt = taken
                tried.add(source.name)
                try:
                    view = self._attempt(source, chunk, stored, raw, timing)
                except FetchError as exc:
                    if self.cancel.is_set():
                        self._end(attempt, Outcome.CANCELLED)
                        raise Cancelled(f"cancelled while fetching {chunk.describe()}") from None
                    if exc.retry_after is not None:
                        retry_after = max(retry_after or 0.0, exc.retry_after)
                    errors[source.name] = str(exc)
                    if not exc.missing:
                        failed.add(source.name)
                    change, dropped = self._end(attempt, outcome_of(exc), 0, str(exc), exc.retry_after)
                    self.on_event(SourceFailed(source.name, chunk.index, str(exc), dropped and exc.bad_bytes))
                    if change is not None:
                        self.on_event(change)
                    continue
                except BaseException:
                    self._end(attempt, Outcome.CANCELLED)
                    raise
                change, _ = self._end(attempt, Outcome.OK, chunk.stored_len)
                if change is not None:
                    self.on_event(change)
                return view, source.name
        with self._cond:
            for r in self.health:
                if r.dropped:
                    errors.setdefault(r.name, f"dropped after serving bad bytes: {r.reason}")
                elif r.failures:
                    errors.setdefault(r.name, f"{r.state(self.health.policy).value}: {r.reason}")
        raise ChunkUnavailable(chunk, errors)

    def _attempt(
        self, source: ChunkSource, chunk: Chunk, stored: memoryview, raw: memoryview, timing: dict[str, float]
    ) -> memoryview:
        # a peer (agent.peer) sends the image bytes it read back from its disk, not the stored form
        raw_form = getattr(source, "serves_raw", False)
        expected = chunk.length if raw_form else chunk.stored_len
        t0 = time.perf_counter()
        n = source.fetch_into(chunk, stored)
        t1 = time.perf_counter()
        timing["fetch"] = timing.get("fetch", 0.0) + t1 - t0
        if n != expected:
            raise FetchError(source.name, f"expected {expected} bytes, got {n}", bad_bytes=True)
        try:
            if raw_form:  # a peer's image bytes, verified as they are
                view = stored[: chunk.length]
                verify_raw(chunk, view)
            else:
                # decompressed (if zstd) straight into `raw`, verified there: nothing is copied
                view = self.decoder.decode_into(chunk, stored[:n], raw)
        except ChunkInvalid as exc:
            raise FetchError(source.name, exc.reason, bad_bytes=True) from None
        finally:
            timing["decode"] = timing.get("decode", 0.0) + time.perf_counter() - t1
        return view
