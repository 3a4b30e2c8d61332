"""Getting one chunk's verified bytes from a set of sources, with retries and failover.

Per chunk: try each usable source in order; a failure moves on to the next one.
After a round where all failed, back off (with jitter) and go round again, up to
`retries` rounds. A source that serves wrong bytes (digest mismatch, wrong
length) `max_bad` times is dropped for the rest of the job; a 404 is not held
against a source. Nothing reaches the caller unverified.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.image.chunk import ChunkInvalid, decompress_bounded, verify_raw
from agent.image.manifest import Chunk, Encoding
from agent.writer.errors import Cancelled, ChunkUnavailable, FetchError
from agent.writer.events import SourceFailed
from agent.writer.sources import ChunkSource


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # rounds over all sources
    backoff: float = 0.2  # seconds before the second round; x4 each round after
    max_bad: int = 3  # bad-byte answers before a source is dropped
    max_backoff: float = 10.0  # the longest wait between rounds
    max_retry_after: float = 60.0  # the longest a server's Retry-After (429/503) is honoured

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


class SourceSet:
    def __init__(
        self,
        sources: Sequence[ChunkSource],
        policy: RetryPolicy,
        on_failure: Callable[[SourceFailed], None],
        cancel: threading.Event,
    ) -> None:
        self.sources = list(sources)
        self.policy = policy
        self.on_failure = on_failure
        self.cancel = cancel
        self.lock = threading.Lock()
        self.strikes = {s.name: 0 for s in sources}
        self.dropped: list[str] = []

    def usable(self) -> list[ChunkSource]:
        with self.lock:
            return [s for s in self.sources if s.name not in self.dropped]

    def _strike(self, source: ChunkSource) -> bool:
        with self.lock:
            self.strikes[source.name] += 1
            if self.strikes[source.name] >= self.policy.max_bad and source.name not in self.dropped:
                self.dropped.append(source.name)
                return True
            return source.name in self.dropped

    def fetch(
        self, chunk: Chunk, stored: memoryview, raw: memoryview, timing: dict[str, float]
    ) -> tuple[memoryview, str]:
        """Return a view of the verified raw bytes (in `stored` or `raw`) and the source's name."""
        errors: dict[str, str] = {}
        retry_after: float | None = None
        for round_ in range(self.policy.retries):
            if round_:
                if self.cancel.wait(self.policy.delay(round_, retry_after)):
                    raise Cancelled(f"cancelled while retrying {chunk.describe()}")
                retry_after = None
            sources = self.usable()
            if not sources:
                break
            for source in sources:
                if self.cancel.is_set():
                    raise Cancelled(f"cancelled while fetching {chunk.describe()}")
                try:
                    view = self._attempt(source, chunk, stored, raw, timing)
                    return view, source.name
                except FetchError as exc:
                    if self.cancel.is_set():
                        raise Cancelled(f"cancelled while fetching {chunk.describe()}") from None
                    if exc.retry_after is not None:
                        retry_after = max(retry_after or 0.0, exc.retry_after)
                    errors[source.name] = str(exc)
                    dropped = self._strike(source) if exc.bad_bytes else False
                    self.on_failure(SourceFailed(source.name, chunk.index, str(exc), dropped))
        for name in self.dropped:
            errors.setdefault(name, "dropped after serving bad bytes")
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
            if chunk.encoding is Encoding.ZSTD and not raw_form:
                data = decompress_bounded(chunk, stored[:n])
                t2 = time.perf_counter()
                timing["decompress"] = timing.get("decompress", 0.0) + t2 - t1
                raw[: chunk.length] = data
                view = raw[: chunk.length]
                t1 = t2
            else:
                view = stored[: chunk.length]
            verify_raw(chunk, view)
        except ChunkInvalid as exc:
            raise FetchError(source.name, exc.reason, bad_bytes=True) from None
        finally:
            timing["verify"] = timing.get("verify", 0.0) + time.perf_counter() - t1
        return view
