"""`sledge image import`: a source image -> chunks in the store + a manifest.

Chunks are read, zero-checked, hashed, compressed and stored by a pool of
threads (pread, blake3, zstd and fsync all release the GIL), with a bounded
window of chunks in flight so memory stays at a few chunks per worker. Ranges
the source reports as holes are never read.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import zstandard

from agent.image.manifest import (
    DEFAULT_CHUNK_SIZE,
    ChunkEntry,
    ChunkKind,
    Encoding,
    Manifest,
    Metadata,
    chunk_count,
    zero_digest,
)
from controller.images.sources import ImageSource
from controller.images.store import WritableStore

SAMPLE = 64 << 10  # bytes from each quarter of a chunk that decide whether to try zstd on it


@dataclass(frozen=True)
class ImportOptions:
    name: str
    version: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    labels: Mapping[str, str] = field(default_factory=dict)
    workers: int = 0  # 0: one per core
    zstd_level: int = 3
    created: int | None = None  # unix seconds; default now (the CLI passes SOURCE_DATE_EPOCH)


@dataclass
class ImportStats:
    image_size: int = 0
    data_bytes: int = 0
    zero_chunks: int = 0
    data_chunks: int = 0
    new_chunks: int = 0
    new_stored_bytes: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ImportResult:
    digest: str
    manifest: Manifest
    stats: ImportStats


class _Ranges:
    """Answers 'does [offset, offset+length) touch data?' from sorted data ranges."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.starts = [r[0] for r in ranges]
        self.ends = [r[1] for r in ranges]

    def touches(self, offset: int, length: int) -> bool:
        i = bisect.bisect_right(self.starts, offset + length - 1) - 1
        return i >= 0 and self.ends[i] > offset


class _Worker:
    def __init__(self, store: WritableStore, source: ImageSource, options: ImportOptions) -> None:
        self.store = store
        self.source = source
        self.options = options
        self.local = threading.local()
        self.lock = threading.Lock()
        self.zeros: dict[int, tuple[bytes, bytes]] = {}
        self.stats = ImportStats()

    def _zero(self, length: int) -> tuple[bytes, bytes]:
        with self.lock:
            if length not in self.zeros:
                self.zeros[length] = (bytes(length), zero_digest(length))
            return self.zeros[length]

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self.local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=self.options.zstd_level, write_content_size=True)
            self.local.cctx = cctx
        return cctx

    def _compress(self, raw: bytes) -> bytes | None:
        """zstd of the chunk, unless a sample of it shows it will not compress (random data,
        already-compressed files): then the whole attempt, the import's costliest step, is skipped."""
        cctx = self._compressor()
        if len(raw) > 4 * SAMPLE:
            samples = b"".join(raw[i : i + SAMPLE] for i in range(0, len(raw), len(raw) // 4))
            if len(cctx.compress(samples)) > len(samples) - len(samples) // 32:
                return None
        packed: bytes = cctx.compress(raw)
        return packed

    def chunk(self, offset: int, length: int, has_data: bool) -> ChunkEntry:
        zeros, zdigest = self._zero(length)
        if not has_data:
            return ChunkEntry(zdigest, ChunkKind.ZERO, Encoding.RAW, 0)
        raw = self.source.pread(length, offset)
        with self.lock:
            self.stats.bytes_read += length
        if raw == zeros:
            return ChunkEntry(zdigest, ChunkKind.ZERO, Encoding.RAW, 0)
        digest = blake3.blake3(raw).digest()
        existing = self.store.stored_size(digest.hex())
        if existing is not None and 0 < existing <= length:
            # Already stored (by an earlier import, or one that was killed): the
            # encoding follows from the size, since zstd is kept only when smaller.
            encoding = Encoding.RAW if existing == length else Encoding.ZSTD
            return ChunkEntry(digest, ChunkKind.DATA, encoding, existing)
        packed = self._compress(raw)
        if packed is not None and len(packed) < length - length // 64:
            stored, encoding = packed, Encoding.ZSTD
        else:
            stored, encoding = raw, Encoding.RAW
        self.store.put_chunk(digest.hex(), stored)
        with self.lock:
            self.stats.new_chunks += 1
            self.stats.new_stored_bytes += len(stored)
        return ChunkEntry(digest, ChunkKind.DATA, encoding, len(stored))


def import_image(
    store: WritableStore,
    source: ImageSource,
    options: ImportOptions,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import `source` into `store` and tag it NAME:VERSION; returns the manifest digest."""
    start = time.monotonic()
    size, cs = source.size, options.chunk_size
    if size <= 0:
        raise ValueError(f"image source {getattr(source, 'path', source)}: expected a size > 0, got {size}")
    ranges = _Ranges(source.data_ranges())
    worker = _Worker(store, source, options)
    workers = options.workers or os.cpu_count() or 2
    entries: list[ChunkEntry] = []
    n = chunk_count(size, cs)
    with store.lock(), ThreadPoolExecutor(workers, thread_name_prefix="import") as pool:
        window: deque[tuple[int, Future[ChunkEntry]]] = deque()
        for i in range(n):
            offset = i * cs
            length = min(cs, size - offset)
            window.append((length, pool.submit(worker.chunk, offset, length, ranges.touches(offset, length))))
            while len(window) > 2 * workers or (i == n - 1 and window):
                done_len, fut = window.popleft()
                entries.append(fut.result())
                if progress:
                    progress(done_len)
        meta = Metadata(
            name=options.name,
            version=options.version,
            created=_created(options),
            source_format=source.format,
            labels=dict(options.labels),
        )
        manifest = Manifest.build(size, cs, meta, entries)
        digest = store.put_manifest(manifest)
        store.tag(options.name, options.version, digest)
    stats = worker.stats
    stats.image_size = size
    stats.data_chunks = sum(1 for e in entries if e.kind is ChunkKind.DATA)
    stats.zero_chunks = n - stats.data_chunks
    stats.data_bytes = manifest.data_size
    stats.seconds = time.monotonic() - start
    return ImportResult(digest, manifest, stats)


def _created(options: ImportOptions) -> int:
    return options.created if options.created is not None else int(time.time())
