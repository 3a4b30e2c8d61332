"""Recorded and hand-made machine trees (tests/fixtures/hardware/*.tar.gz), unpacked once per run.

They are archives because their sysfs-style symlinks point back up the tree, and
tools that walk a checkout following links (setuptools, pytest) would loop in them.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tarfile
import tempfile
from pathlib import Path

ARCHIVES = Path(__file__).parent / "fixtures" / "hardware"


@functools.cache
def machine_trees() -> Path:
    """A directory holding one unpacked tree per shape: <dir>/<shape>/{sys,proc,dev,probes.json}."""
    dest = Path(tempfile.mkdtemp(prefix="sledge-machines-"))
    atexit.register(shutil.rmtree, dest, True)
    for archive in sorted(ARCHIVES.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="tar")
    return dest
