"""busy_reasons on recorded sysfs/proc trees: holders (md, LVM, dm-crypt), mounts, swap."""

from __future__ import annotations

import os
from pathlib import Path

from agent.writer.device import SysPaths, busy_reasons


def tree(tmp_path: Path, holders: dict[str, str], mounts: str = "", swaps: str = "") -> SysPaths:
    sysroot, proc = tmp_path / "sys", tmp_path / "proc"
    disk = sysroot / "devices" / "virtual" / "block" / "sdz"
    (disk / "holders").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    part = disk / "sdz1"
    (part / "holders").mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (part / "dev").write_text("8:1\n")
    (sysroot / "dev" / "block").mkdir(parents=True)
    (sysroot / "dev" / "block" / "8:0").symlink_to(disk)
    (sysroot / "class" / "block").mkdir(parents=True)
    for holder, uuid in holders.items():
        hdir = sysroot / "devices" / "virtual" / "block" / holder
        (hdir / "dm").mkdir(parents=True)
        if uuid:
            (hdir / "dm" / "uuid").write_text(uuid + "\n")
        (part / "holders" / holder).symlink_to(hdir)
        (sysroot / "class" / "block" / holder).symlink_to(hdir)
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mounts)
    (proc / "swaps").write_text("Filename Type Size Used Priority\n" + swaps)
    return SysPaths(str(sysroot), str(proc))


class FakeStat:
    st_rdev = os.makedev(8, 0)


def test_idle_disk_has_no_reasons(tmp_path: Path) -> None:
    assert busy_reasons("/dev/sdz", FakeStat(), tree(tmp_path, {})) == []  # type: ignore[arg-type]


def test_holders_are_named_with_their_kind(tmp_path: Path) -> None:
    paths = tree(tmp_path, {"dm-0": "LVM-abc", "dm-1": "CRYPT-LUKS2-x", "md127": ""})
    reasons = busy_reasons("/dev/sdz", FakeStat(), paths)  # type: ignore[arg-type]
    assert "sdz1 is held by dm-0 (LVM)" in reasons
    assert "sdz1 is held by dm-1 (dm-crypt)" in reasons
    assert "sdz1 is held by md127 (md RAID)" in reasons


def test_mounted_partition_and_swap_are_named(tmp_path: Path) -> None:
    mounts = "36 25 8:1 / /srv rw,relatime shared:1 - ext4 /dev/sdz1 rw\n"
    paths = tree(tmp_path, {}, mounts=mounts, swaps="/dev/sdz 1 partition 100 0 -2\n")
    reasons = busy_reasons("/dev/sdz", FakeStat(), paths)  # type: ignore[arg-type]
    assert "sdz1 is mounted on /srv" in reasons
    assert "/dev/sdz is in use as swap" in reasons
