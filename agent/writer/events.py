"""Typed, immutable events the writer emits, and the throttle that paces them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    image_size: int
    done_bytes: int  # image bytes settled (in place, zeroed, skipped or written)
    fetched_bytes: int  # stored bytes downloaded
    written_bytes: int
    chunks_total: int
    chunks_inplace: int
    chunks_zero: int
    chunks_fetched: int
    rate: float  # image bytes per second so far
    eta: float  # seconds


@dataclass(frozen=True)
class SourceFailed:
    source: str
    chunk_index: int
    error: str
    dropped: bool  # the source is not used again in this job


@dataclass(frozen=True)
class SourceHealthChanged:
    source: str
    state: str  # "demoted" (asked only by a probe now and then), "restored", "dropped"
    reason: str


@dataclass(frozen=True)
class Phase:
    name: str  # "write", "sync", "gpt", "verify"


@dataclass(frozen=True)
class WriteReport:
    manifest: str
    target: str
    image_size: int
    chunks_total: int
    chunks_inplace: int
    chunks_zero: int
    chunks_skipped: int
    chunks_fetched: int
    fetched_bytes: int
    written_bytes: int
    zeroed_bytes: int
    seconds: float
    chunks_restored: int = 0  # table chunks rebuilt from the disk, verified, written: not downloaded
    busy: dict[str, float] = field(default_factory=dict)  # stage -> thread-seconds
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    dropped_sources: tuple[str, ...] = ()
    gpt_relocated: bool = False
    verified: bool = False

    @property
    def rate(self) -> float:
        return self.image_size / self.seconds if self.seconds > 0 else 0.0


Event = Progress | SourceFailed | SourceHealthChanged | Phase
SourceEvent = SourceFailed | SourceHealthChanged
Listener = Callable[[Event], None]


class Counters:
    """Thread-safe running totals; emits a Progress at most every `interval` seconds."""

    def __init__(self, image_size: int, chunks: int, listener: Listener | None, interval: float) -> None:
        self.image_size = image_size
        self.chunks_total = chunks
        self.listener = listener
        self.interval = interval
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.last_emit = 0.0
        self.done_bytes = self.fetched = self.written = self.zeroed = 0
        self.inplace = self.zero = self.fetched_chunks = self.skipped = 0
        self.restored = 0  # chunks rebuilt from the disk's own bytes (sledge's table edits undone)
        self.busy: dict[str, float] = {}
        self.by_source: dict[str, int] = {}

    def add(self, *, done: int = 0, **counts: int) -> None:
        with self.lock:
            self.done_bytes += done
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
            now = time.monotonic()
            due = now - self.last_emit >= self.interval
            if due:
                self.last_emit = now
        if due:
            self.emit()

    def add_busy(self, times: dict[str, float]) -> None:
        with self.lock:
            for k, v in times.items():
                self.busy[k] = self.busy.get(k, 0.0) + v

    def add_source_bytes(self, source: str, n: int) -> None:
        with self.lock:
            self.by_source[source] = self.by_source.get(source, 0) + n
            self.fetched += n

    def snapshot(self) -> Progress:
        with self.lock:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            rate = self.done_bytes / elapsed
            remaining = self.image_size - self.done_bytes
            return Progress(
                self.image_size,
                self.done_bytes,
                self.fetched,
                self.written,
                self.chunks_total,
                self.inplace,
                self.zero,
                self.fetched_chunks,
                rate,
                remaining / rate if rate > 0 else 0.0,
            )

    def emit(self) -> None:
        if self.listener is not None:
            self.listener(self.snapshot())
