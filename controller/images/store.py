"""Writing a chunk store: atomic files, dedup, catalog, prune and verify.

Every file reaches its final name by write -> fsync -> rename, so a crash leaves
at worst a temporary file under tmp/ (removed by prune), never a bad chunk,
manifest or catalog entry. A shared flock is held while importing and an
exclusive one while pruning, so prune never takes a chunk an import is about to
reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.image import layout
from agent.image.chunk import ChunkInvalid
from agent.image.manifest import Chunk, Manifest, manifest_digest
from agent.image.store import CatalogEntry, LocalStore, NotInStore, StoreError, StoreFileError


@dataclass(frozen=True)
class BadChunk:
    path: Path
    reason: str
    manifests: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReport:
    manifests: int
    chunks: int
    bytes_checked: int
    bad: tuple[BadChunk, ...]
    bad_manifests: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.bad and not self.bad_manifests


class WritableStore(LocalStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        for sub in ("chunks", "manifests", "catalog", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _atomic_write(self, relative: str, data: bytes | memoryview, sync_dir: bool) -> None:
        final = self.root / relative
        tmp = self.root / "tmp" / f"{final.name}.{uuid.uuid4().hex[:12]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        if sync_dir:
            _fsync_dir(final.parent)

    def stored_size(self, digest_hex: str) -> int | None:
        """Size of a stored chunk file, or None if the store lacks it."""
        try:
            return (self.root / layout.chunk_path(digest_hex)).stat().st_size
        except FileNotFoundError:
            return None

    def put_chunk(self, digest_hex: str, stored: bytes | memoryview) -> None:
        # Directory entries are synced once per import by sync_chunk_dirs().
        self._atomic_write(layout.chunk_path(digest_hex), stored, sync_dir=False)

    def sync_chunk_dirs(self, manifest: Manifest) -> None:
        for prefix in sorted({c.hex[:2] for c in manifest.data_chunks()}):
            directory = self.root / "chunks" / prefix
            if directory.is_dir():  # absent after a manifest-only pull: nothing there to sync
                _fsync_dir(directory)

    def put_manifest(self, manifest: Manifest) -> str:
        data = manifest.encode()
        digest = manifest_digest(data)
        self.sync_chunk_dirs(manifest)
        self._atomic_write(layout.manifest_path(digest), data, sync_dir=True)
        return digest

    def tag(self, name: str, version: str, digest: str) -> None:
        layout.check_digest(digest)
        if not (self.root / layout.manifest_path(digest)).exists():
            raise NotInStore(f"manifest {digest}: not in store {self.root}")
        self._atomic_write(layout.catalog_path(name, version), f"{digest}\n".encode(), sync_dir=True)

    def remove(self, entry: CatalogEntry) -> bool:
        """Drop a catalog entry, and its manifest when no other entry names it.

        Returns whether the manifest went too. Chunks stay until prune.
        """
        if entry.name:
            path = self.root / layout.catalog_path(entry.name, entry.version)
            path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        if any(e.digest == entry.digest for e in self.catalog()):
            return False
        (self.root / layout.manifest_path(entry.digest)).unlink(missing_ok=True)
        return True

    def manifest_digests(self) -> list[str]:
        return sorted(p.name for p in (self.root / "manifests").iterdir() if len(p.name) == 64)

    def prune(self) -> tuple[int, int]:
        """Remove chunks no manifest references and stale temporaries: (files, bytes) freed."""
        with self.lock(exclusive=True):
            referenced: set[str] = set()
            for digest in self.manifest_digests():
                referenced.update(c.hex for c in self.manifest(digest).data_chunks())
            files = freed = 0
            for prefix in (self.root / "chunks").iterdir():
                for path in prefix.iterdir():
                    if path.name not in referenced:
                        freed += path.stat().st_size
                        path.unlink()
                        files += 1
                with contextlib.suppress(OSError):
                    prefix.rmdir()
            for path in (self.root / "tmp").iterdir():
                freed += path.stat().st_size
                path.unlink()
                files += 1
            return files, freed

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Rehash every chunk every manifest references; name each bad one with its path."""
        users: dict[str, list[str]] = {}
        chunks: dict[str, Chunk] = {}
        bad_manifests: list[str] = []
        digests = self.manifest_digests()
        for digest in digests:
            try:
                manifest = self.manifest(digest)
            except StoreError as exc:
                bad_manifests.append(f"{digest}: {exc}")
                continue
            for chunk in manifest.data_chunks():
                users.setdefault(chunk.hex, []).append(digest)
                chunks.setdefault(chunk.hex, chunk)
        for entry in self.catalog():
            if not (self.root / layout.manifest_path(entry.digest)).exists():
                bad_manifests.append(f"{entry.name}:{entry.version}: manifest {entry.digest} missing")
        bad: list[BadChunk] = []
        checked = 0
        for hex_digest, chunk in sorted(chunks.items()):
            try:
                self.read_chunk(chunk)
            except (ChunkInvalid, NotInStore, StoreFileError) as exc:
                reason = "missing" if isinstance(exc, NotInStore) else exc.reason
                bad.append(BadChunk(self.chunk_file(chunk), reason, tuple(users[hex_digest])))
            checked += chunk.stored_len
            if progress:
                progress(chunk.stored_len)
        return VerifyReport(len(digests), len(chunks), checked, tuple(bad), tuple(bad_manifests))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
