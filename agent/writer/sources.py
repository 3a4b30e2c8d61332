"""Chunk sources: a chunk store over HTTP (the controller, nginx mirrors; httpsource.py)
or in a directory.

A source only moves stored bytes into a caller's buffer; it never decides whether
they are good.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from agent.image import layout
from agent.image.manifest import Chunk
from agent.image.store import NotInStore, StoreError, StoreFileError, read_store_file, read_store_file_into
from agent.writer.errors import FetchError
from agent.writer.httpsource import HttpSource, Timeouts

__all__ = ["BoundedSource", "ChunkSource", "DirectorySource", "HttpSource", "Timeouts", "open_source"]


class ChunkSource(Protocol):
    name: str

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        """Read the chunk's stored bytes into buf[:chunk.stored_len]; return the count."""
        ...

    def get(self, relative: str, limit: int) -> bytes:
        """A small file of the store (a manifest), at most `limit` bytes."""
        ...

    def interrupt(self) -> None:
        """Abort what is in flight and refuse new requests (a cancelled job); may be a no-op."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class BoundedSource(Protocol):
    """A source that can also cut one request short (HttpSource): source health bounds the tries
    of a source under suspicion with it. Sources without it are tried with their own timeouts."""

    def fetch_within(self, chunk: Chunk, buf: memoryview, budget: float | None) -> int: ...


class DirectorySource:
    def __init__(self, root: str) -> None:
        self.root = root
        self.name = root

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        # the one guarded reader of store files (agent.image.store): no FIFO, exact size
        try:
            return read_store_file_into(
                os.path.join(self.root, layout.chunk_path(chunk.hex)), buf, chunk.stored_len
            )
        except StoreError as exc:
            raise _fetch_error(self.name, exc) from None

    def get(self, relative: str, limit: int) -> bytes:
        try:
            return read_store_file(os.path.join(self.root, relative), limit)
        except StoreError as exc:
            raise _fetch_error(self.name, exc) from None

    def interrupt(self) -> None:
        pass  # a local read is never stuck for long

    def close(self) -> None:
        pass


def _fetch_error(name: str, exc: StoreError) -> FetchError:
    if isinstance(exc, NotInStore):
        return FetchError(name, str(exc), missing=True)
    damaged = isinstance(exc, StoreFileError) and exc.damaged
    return FetchError(name, str(exc), bad_bytes=damaged)


def open_source(spec: str, timeouts: Timeouts | None = None) -> ChunkSource:
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, timeouts)
    if os.path.isdir(spec):
        return DirectorySource(spec)
    raise ValueError(f"chunk source {spec!r}: expected an http(s) URL or a store directory")
