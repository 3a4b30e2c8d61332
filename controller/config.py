"""Where the controller keeps its data; one place decides it."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir(environ: dict[str, str] | None = None, euid: int | None = None) -> Path:
    """$SLEDGE_DATA, else /var/lib/sledge as root, else ~/.local/share/sledge."""
    env = os.environ if environ is None else environ
    if env.get("SLEDGE_DATA"):
        return Path(env["SLEDGE_DATA"])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/sledge")
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "sledge"


def store_dir(data_dir: Path) -> Path:
    return data_dir / "store"
