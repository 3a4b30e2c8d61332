"""Where jobs get their chunk sources and disk targets: the real ones, and fakes beside them.

Jobs never build an HttpSource or open a device themselves; they ask the job
context's `Sources` (base URLs -> chunk sources) and `Disks` (device path -> an
open target, or a seed written on it). `sledge-agent run` injects the real ones;
tests inject a directory store and sparse files standing in for disks, so deploy,
erase and verify run with no server and no disk.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.writer.device import OpenTarget, open_for_read, open_target
from agent.writer.errors import TargetError

if TYPE_CHECKING:
    from agent.runtime.seed import SeedContent, SeedReport
    from agent.writer.sources import ChunkSource

# The seed, NVRAM and chunk-source modules are imported where a job first needs them, not at the
# agent's start: start-up is on every boot's way to "registered" (~1 s of imports under TCG).

# -- the real ones ---------------------------------------------------------------------------------


class HttpSources:
    """Chunk stores over HTTP(S): the controller and its mirrors, the CA pinned if given."""

    def __init__(self, ca_file: str = "") -> None:
        self.ca_file = ca_file

    def open(self, bases: Sequence[str]) -> list[ChunkSource]:
        from agent.writer.sources import HttpSource

        return [HttpSource(url, ca_file=self.ca_file) for url in bases]


class BlockDisks:
    """This machine's devices, with the writer's refusals (mounted, held, read-only) and O_EXCL."""

    def open_write(self, path: str, image_size: int) -> OpenTarget:
        return open_target(path, image_size)

    def open_read(self, path: str) -> OpenTarget:
        return open_for_read(path)

    def write_seed(self, path: str, content: SeedContent) -> SeedReport:
        from agent.runtime.seed import write_seed

        return write_seed(path, content)

    def boot_entry(self, path: str, description: str) -> str:
        from agent.runtime.efivars import boot_entry_for

        return boot_entry_for(path, description)


# -- fakes -----------------------------------------------------------------------------------------


class DirectorySources:
    """Every base URL served from one chunk store directory (a fake controller store)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root)
        self.opened: list[tuple[str, ...]] = []  # the bases each job asked for

    def open(self, bases: Sequence[str]) -> list[ChunkSource]:
        self.opened.append(tuple(bases))
        from agent.writer.sources import DirectorySource

        return [DirectorySource(self.root)]


_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def _punch_hole(fd: int, offset: int, length: int) -> None:
    # ctypes only here: the stdlib has no fallocate(2) with flags, and only the fakes need it
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclasses.dataclass
class SparseTarget(OpenTarget):
    """A sparse file standing in for a disk: zeroing punches holes (as a loop device's
    zeroout does), so erasing a fake terabyte costs nothing; `pace` slows every write
    and zero (a slow disk, for cancel tests)."""

    pace: float = 0.0
    writes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (offset, length)
    zeroed: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def write(self, data: bytes | memoryview, offset: int, aligned: bool = False) -> None:
        time.sleep(self.pace)
        self.writes.append((offset, len(data)))
        super().write(data, offset, aligned)

    def zero(self, offset: int, length: int) -> None:
        time.sleep(self.pace)
        self.zeroed.append((offset, length))
        try:
            _punch_hole(self.buffered_fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            super().zero(offset, length)  # a filesystem without holes: write the zeros


class SparseDisks:
    """Device paths (/dev/sda...) backed by sparse files under `root`, created at their sizes.

    A target opens the file but carries the device's path, so messages read as on a real
    machine; an image larger than the disk is refused as a device would refuse it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        sizes: Mapping[str, int],
        pace: float = 0.0,
        efi: Path | None = None,
    ) -> None:
        """efi: a directory standing for /sys/firmware/efi (with efivars/ below it); None: a BIOS
        machine, no NVRAM."""
        self.efi = efi
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sizes = dict(sizes)
        self.pace = pace
        self.opened: list[SparseTarget] = []
        self._lock = threading.Lock()
        for path, size in self.sizes.items():
            with open(self.file(path), "ab") as f:
                f.truncate(size)

    def file(self, path: str) -> Path:
        if path not in self.sizes:
            raise TargetError(f"target {path}: no such disk (fake disks: {', '.join(sorted(self.sizes))})")
        return self.root / (path.strip("/").replace("/", "_") + ".img")

    def _wrap(self, path: str, target: OpenTarget) -> SparseTarget:
        fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(OpenTarget)}
        fake = SparseTarget(**{**fields, "path": path}, pace=self.pace)
        with self._lock:
            self.opened.append(fake)
        return fake

    def open_write(self, path: str, image_size: int) -> OpenTarget:
        file = self.file(path)
        if image_size > self.sizes[path]:
            raise TargetError(f"target {path}: image needs {image_size} bytes, device has {self.sizes[path]}")
        return self._wrap(path, open_target(str(file), image_size))

    def open_read(self, path: str) -> OpenTarget:
        return self._wrap(path, open_for_read(str(self.file(path))))

    def write_seed(self, path: str, content: SeedContent) -> SeedReport:
        from agent.runtime.seed import write_seed

        report = write_seed(str(self.file(path)), content)
        return dataclasses.replace(report, device=path)

    def boot_entry(self, path: str, description: str) -> str:
        if self.efi is None:
            return ""
        from agent.runtime.efivars import boot_entry_for

        return boot_entry_for(str(self.file(path)), description, self.efi)
