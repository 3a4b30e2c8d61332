"""The TFTP root: a directory holding only the iPXE binaries, copied from Debian's `ipxe` package.

Copies, not links: dnsmasq's tftp-secure serves only files its user owns, and a symlink out of
the root would point TFTP clients at the package's directory. Anything else found in the root is
removed, so what TFTP serves is exactly this list.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from controller.boot.errors import BootError, OptionError


def fill(root: Path, source: Path, names: tuple[str, ...]) -> None:
    """Make `root` hold exactly `names`, copied from `source` (only when changed)."""
    for name in names:
        if not (source / name).is_file():
            raise OptionError(
                "--ipxe-efi" if name.endswith(".efi") else "TFTP boot file",
                f"{source / name} (Debian package `ipxe`)",
                "no such file",
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
        for entry in root.iterdir():
            if entry.name not in names or entry.is_symlink() or not entry.is_file():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for name in names:
            src, dest = source / name, root / name
            if dest.exists() and dest.read_bytes() == src.read_bytes():
                continue
            tmp = root / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)  # a TFTP client never reads a half-copied binary
    except OSError as exc:
        raise BootError(f"TFTP root {root}: {exc}") from exc
    check_readable(root, names)


def check_readable(root: Path, names: tuple[str, ...]) -> None:
    if not os.access(root, os.R_OK | os.X_OK):
        raise OptionError("TFTP root", f"a readable directory at {root}", "not readable")
    for name in names:
        if not os.access(root / name, os.R_OK):
            raise OptionError("TFTP root", f"{root / name} readable", "not readable")
