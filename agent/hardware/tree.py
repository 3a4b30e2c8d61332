"""Reading sysfs, procfs and /dev under a root path, so tests can point at a recorded tree.

sysfs answers some reads with EINVAL or EIO (a link that is down has no speed),
so every read here returns None instead of raising: a missing fact is a None in
the inventory, never a crash. An optional observer sees every path touched,
which is how scripts record a fixture tree that holds exactly what is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Observer = Callable[[str, Path], None]  # (kind, absolute path): kind is read, list, link or stat


@dataclass(frozen=True)
class Roots:
    """Where the three trees live; the defaults are this machine."""

    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")


class Tree:
    """Tolerant reads of paths relative to one root."""

    def __init__(self, root: Path, observer: Observer | None = None) -> None:
        self.root = root
        self._observer = observer

    def _path(self, rel: str, kind: str) -> Path:
        path = self.root / rel.lstrip("/")
        if self._observer is not None:
            self._observer(kind, path)
        return path

    def raw(self, rel: str, limit: int = 1 << 20) -> bytes | None:
        try:
            with open(self._path(rel, "read"), "rb") as f:
                return f.read(limit)
        except OSError:
            return None

    def text(self, rel: str) -> str | None:
        """Contents without surrounding whitespace; None when missing, unreadable or empty."""
        data = self.raw(rel)
        if data is None:
            return None
        value = data.decode("utf-8", "replace").strip()
        return value or None

    def int(self, rel: str, base: int = 10) -> int | None:
        value = self.text(rel)
        if value is None:
            return None
        try:
            return int(value, base)
        except ValueError:
            return None

    def flag(self, rel: str) -> bool | None:
        value = self.int(rel)
        return None if value is None else value != 0

    def list(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(rel, "list")))
        except OSError:
            return []

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self._path(rel, "stat"))

    def is_dir(self, rel: str) -> bool:
        return self._path(rel, "stat").is_dir()

    def link_name(self, rel: str) -> str | None:
        """Last component of a symlink's target (a driver's name, a device's address)."""
        try:
            return os.path.basename(os.readlink(self._path(rel, "link")))
        except OSError:
            return None

    def resolve(self, rel: str) -> str | None:
        """The real path, relative to the root and starting with "/" (e.g. /devices/pci0000:00/...)."""
        path = self._path(rel, "link")
        if not os.path.lexists(path):
            return None
        real = os.path.realpath(path)
        root = os.path.realpath(self.root)
        if real != root and not real.startswith(root + os.sep):
            return None
        return "/" + os.path.relpath(real, root)
