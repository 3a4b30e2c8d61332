"""Chunk sources: a chunk store over HTTP (the controller, nginx mirrors; httpsource.py)
or in a directory.

A source only moves stored bytes into a caller's buffer; it never decides whether
they are good.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol

from agent.image import layout
from agent.image.manifest import Chunk
from agent.writer.errors import FetchError
from agent.writer.httpsource import HttpSource, Timeouts

__all__ = ["ChunkSource", "DirectorySource", "HttpSource", "Timeouts", "open_source"]


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


class DirectorySource:
    def __init__(self, root: str) -> None:
        self.root = root
        self.name = root

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        path = os.path.join(self.root, layout.chunk_path(chunk.hex))
        try:  # O_NONBLOCK: a FIFO planted in a store must not hold the open forever
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FetchError(self.name, f"{path}: no such chunk", missing=True) from None
        except OSError as exc:
            raise FetchError(self.name, f"{path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FetchError(self.name, f"{path}: expected a regular file", bad_bytes=True)
            size = st.st_size
            if size != chunk.stored_len:
                raise FetchError(
                    self.name, f"{path}: expected {chunk.stored_len} bytes, file has {size}", bad_bytes=True
                )
            got = 0
            while got < size:
                n = os.preadv(fd, [buf[got:size]], got)
                if n == 0:
                    raise FetchError(self.name, f"{path}: short read at {got} of {size}", bad_bytes=True)
                got += n
            return got
        finally:
            os.close(fd)

    def get(self, relative: str, limit: int) -> bytes:
        path = os.path.join(self.root, relative)
        try:
            with open(path, "rb") as f:
                return f.read(limit + 1)
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError)
            raise FetchError(self.name, f"{path}: {exc.strerror}", missing=missing) from None

    def interrupt(self) -> None:
        pass  # a local read is never stuck for long

    def close(self) -> None:
        pass


def open_source(spec: str, timeouts: Timeouts | None = None) -> ChunkSource:
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, timeouts)
    if os.path.isdir(spec):
        return DirectorySource(spec)
    raise ValueError(f"chunk source {spec!r}: expected an http(s) URL or a store directory")
