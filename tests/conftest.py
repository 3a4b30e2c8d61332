"""Shared fixtures. Tests marked `root` need root (loop devices). A developer without root sees
them skipped with the reason, and can deselect them with -m "not root". Under CI a skipped root
test would be lost coverage behind a green run, so there a non-root run stops before any test
with a non-zero status (tests/tools.py does the same for missing host tools)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tools import under_ci


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only tests that would run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    needs_root = [item for item in items if "root" in item.keywords]
    if not needs_root:
        return
    if under_ci():
        pytest.exit(
            f"CI must run as root: {len(needs_root)} selected tests need root (loop devices), "
            f"e.g. {needs_root[0].nodeid}, and this run is uid {os.geteuid()}; run the suite as root "
            '(deselecting them with -m "not root" drops their coverage)',
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    for item in needs_root:
        item.add_marker(pytest.mark.skip(reason="needs root for loop devices (CI runs it)"))


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: loop_device(size_bytes) -> /dev/loopN backed by a sparse file; detached after."""
    devices: list[str] = []

    def make(size: int, direct_io: bool = True, name: str = "disk.img") -> str:
        backing = tmp_path / f"{len(devices)}-{name}"
        with open(backing, "wb") as f:
            f.truncate(size)
        cmd = ["losetup", "-f", "--show"] + (["--direct-io=on"] if direct_io else []) + [str(backing)]
        dev = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        devices.append(dev)
        # partitions added by an earlier user of this loop device with partx (BLKPG) outlive
        # `losetup -d`; a stale /dev/loopNpM would let a test pass or fail for the wrong reason
        drop_partitions(dev)
        return dev

    yield make
    for dev in devices:
        drop_partitions(dev)
        subprocess.run(["losetup", "-d", dev], check=False)


def drop_partitions(dev: str) -> None:
    """Remove the kernel's partition nodes of `dev` (partx -d), whatever its table says."""
    name = os.path.basename(dev)
    if any(p.startswith(name + "p") for p in os.listdir(f"/sys/block/{name}")):
        subprocess.run(["partx", "-d", dev], check=False, capture_output=True)
