"""Reading a chunk store that sits in a local directory.

The HTTP side of the same store (nginx, the controller) is read by the writer's
sources; this module is the plain-directory reader both sides share.
"""

from __future__ import annotations

import os
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
            with open(path, "rb") as f:
                return f.read(chunk.stored_len + 1)
        except FileNotFoundError:
            raise NotInStore(f"{chunk.describe()}: not in store {self.root} (no {path})") from None

    def read_chunk(self, chunk: Chunk) -> bytes:
        """The raw, verified bytes of a data chunk (ChunkInvalid if the stored file is damaged)."""
        return decode_stored(chunk, self.read_stored(chunk))

    def manifest_bytes(self, digest: str) -> bytes:
        path = self.path(layout.manifest_path(digest))
        try:
            with open(path, "rb") as f:
                return f.read(Limits().max_manifest_bytes + 1)
        except FileNotFoundError:
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
                digest = version_file.read_text().strip()
                entries.append(CatalogEntry(name_dir.name, version_file.name, layout.check_digest(digest)))
        return entries
