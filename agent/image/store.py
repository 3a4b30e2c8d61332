"""Reading a chunk store that sits in a local directory.

The HTTP side of the same store (nginx, the controller) is read by the writer's
sources; this module is the plain-directory reader both sides share. Every read of
a store file (the writer's DirectorySource, LocalStore, the controller's verify,
export and file serving) goes through `open_store_file`: a FIFO, device node or
directory planted where a chunk, manifest or catalog entry should be is a clear
StoreFileError, never a read that hangs or one of a file nobody asked for.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.image import layout
from agent.image.chunk import decode_stored
from agent.image.errors import ImageError
from agent.image.manifest import Chunk, Limits, Manifest, ManifestError, decode


class StoreError(ImageError):
    """A store that does not hold what was asked for, or holds it damaged."""


class NotInStore(StoreError):
    pass


class StoreFileError(StoreError):
    """A store file that cannot be read as one: not a regular file, the wrong size, or an OS error.

    `damaged`: the file is there but is not what the store should hold (retrying will not help).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, damaged: bool = True) -> None:
        self.path = str(path)
        self.reason = reason
        self.damaged = damaged
        super().__init__(f"{path}: {reason}")


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_store_file(path: str | os.PathLike[str]) -> tuple[int, int]:
    """An open fd on a regular store file, and its size; the caller closes the fd.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. It
    changes nothing for a regular file, and anything else is refused before a byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotInStore(f"{path}: no such file") from None
    except OSError as exc:
        raise StoreFileError(path, exc.strerror or str(exc), damaged=False) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            found = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise StoreFileError(path, f"expected a regular file, found {found}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_store_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most limit + 1 bytes of a regular store file (one more, so the caller sees an overlong one)."""
    fd, _ = open_store_file(path)
    try:
        parts, got = [], 0
        while got <= limit:
            data = os.read(fd, min(limit + 1 - got, 1 << 20))
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)
    except OSError as exc:
        raise StoreFileError(path, f"reading: {exc.strerror or exc}", damaged=False) from None
    finally:
        os.close(fd)


def read_store_file_into(path: str | os.PathLike[str], buf: memoryview, size: int) -> int:
    """Exactly `size` bytes of a regular store file into buf[:size]; a file of another size is damaged."""
    fd, actual = open_store_file(path)
    try:
        if actual != size:
            raise StoreFileError(path, f"expected {size} bytes, file has {actual}")
        got = 0
        while got < size:
            n = os.preadv(fd, [buf[got:size]], got)
            if n == 0:
                raise StoreFileError(path, f"short read at {got} of {size} bytes")
            got += n
        return got
    except OSError as exc:
        raise StoreFileError(path, f"reading: {exc.strerror or exc}", damaged=False) from None
    finally:
        os.close(fd)


CATALOG_ENTRY_MAX = 256  # a catalog file holds one digest and a newline


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: str
    digest: str


class LocalStore:
    """A chunk store directory (see agent.image.layout for the tree)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def chunk_file(self, chunk: Chunk) -> Path:
        return self.path(layout.chunk_path(chunk.hex))

    def read_stored(self, chunk: Chunk) -> bytes:
        """A chunk's stored bytes, unverified; reads at most one byte past stored_len."""
        path = self.chunk_file(chunk)
        try:
            return read_store_file(path, chunk.stored_len)
        except NotInStore:
            raise NotInStore(f"{chunk.describe()}: not in store {self.root} (no {path})") from None

    def read_chunk(self, chunk: Chunk) -> bytes:
        """The raw, verified bytes of a data chunk (ChunkInvalid if the stored file is damaged)."""
        return decode_stored(chunk, self.read_stored(chunk))

    def manifest_bytes(self, digest: str) -> bytes:
        path = self.path(layout.manifest_path(digest))
        try:
            return read_store_file(path, Limits().max_manifest_bytes)
        except NotInStore:
            raise NotInStore(f"manifest {digest}: not in store {self.root}") from None

    def manifest(self, digest: str) -> Manifest:
        try:
            return decode(self.manifest_bytes(digest), expect_digest=digest)
        except ManifestError as exc:
            raise StoreError(f"manifest {digest} in {self.root}: {exc}") from None

    def resolve(self, ref: str) -> CatalogEntry:
        """NAME:VERSION, NAME (the newest version) or a manifest digest -> catalog entry."""
        if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
            for entry in self.catalog():
                if entry.digest == ref:
                    return entry
            if self.path(layout.manifest_path(ref)).exists():
                return CatalogEntry("", "", ref)
            raise NotInStore(f"manifest {ref}: not in store {self.root}")
        name, version = layout.parse_ref(ref)
        entries = [e for e in self.catalog() if e.name == name]
        if version is not None:
            entries = [e for e in entries if e.version == version]
        if not entries:
            raise NotInStore(f"image {ref!r}: not in the catalog of {self.root}")
        newest = max(
            entries,
            key=lambda e: self.path(layout.catalog_path(e.name, e.version)).stat().st_mtime_ns,
        )
        return newest

    def catalog(self) -> list[CatalogEntry]:
        base = self.path("catalog")
        entries: list[CatalogEntry] = []
        if not base.is_dir():
            return entries
        for name_dir in sorted(base.iterdir()):
            if not name_dir.is_dir() or name_dir.name.startswith("."):
                continue
            for version_file in sorted(name_dir.iterdir()):
                if version_file.name.startswith("."):
                    continue
                digest = read_store_file(version_file, CATALOG_ENTRY_MAX).decode(errors="replace").strip()
                entries.append(CatalogEntry(name_dir.name, version_file.name, layout.check_digest(digest)))
        return entries
