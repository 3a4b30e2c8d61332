"""The writer's exceptions, all in one place.

WriteError
├── TargetError          the target cannot be written (busy, mounted, too small, read-only)
├── ManifestUnavailable  the manifest could not be had
│   └── BadManifest      ... or is not the one asked for, or is invalid
├── ChunkUnavailable     every source failed a chunk (names the chunk and each source's error)
├── VerifyFailed         read-back found chunks that differ
├── Cancelled            stopped at a chunk boundary on request
├── Deferred             a source hands the chunk back to the fetch order, to be taken later
└── FetchError           one attempt at one source failed (kept per source, retried; a caller
                         that fails over catches it before WriteError)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.errors import SledgeError
from agent.image.manifest import Chunk


class WriteError(SledgeError):
    """The root of the writer's errors."""


class TargetError(WriteError):
    pass


class ManifestUnavailable(WriteError):
    pass


class BadManifest(ManifestUnavailable):
    """The manifest's bytes are wrong (not the digest asked for, or invalid): retrying will not help."""


class Cancelled(WriteError):
    pass


class Deferred(WriteError):
    """Raised by a source (the peer source) that cannot serve the chunk now but will later: the
    writer's thread drops the step, which the fetch order (WriteOptions.order) has taken back."""


class ChunkUnavailable(WriteError):
    def __init__(self, chunk: Chunk, errors: Mapping[str, str]) -> None:
        self.chunk = chunk
        self.errors = dict(errors)
        detail = "; ".join(f"{src}: {err}" for src, err in self.errors.items()) or "no usable source"
        super().__init__(f"{chunk.describe()}: every source failed ({detail})")


class VerifyFailed(WriteError):
    def __init__(self, bad: list[Chunk], tables: Sequence[str] = ()) -> None:
        self.bad = bad
        self.tables = list(tables)
        names = ", ".join(f"{c.index}@{c.offset}" for c in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        parts = [f"{len(bad)} chunks differ from the image: {names}{more}"] if bad or not tables else []
        if tables:  # past the image's end: table sectors sledge wrote there (the moved backup GPT)
            parts.append("the partition table past the image differs: " + "; ".join(self.tables[:5]))
        message = "read-back verification: " + "; ".join(parts)
        super().__init__(message)


class FetchError(WriteError):
    """One failed attempt; `bad_bytes` marks a source that served wrong data (not just failed),
    `slow` one that stalled or trickled past its deadline (source health tells them apart)."""

    def __init__(
        self,
        source: str,
        message: str,
        bad_bytes: bool = False,
        missing: bool = False,
        retry_after: float | None = None,
        slow: bool = False,
    ) -> None:
        self.source = source
        self.slow = slow
        self.bad_bytes = bad_bytes
        self.missing = missing
        self.retry_after = retry_after  # seconds the server asked us to wait (429/503 Retry-After)
        super().__init__(message)
