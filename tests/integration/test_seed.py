"""write_seed on real disk images, checked with the real tools: sgdisk, sfdisk, mtools, blkid,
fsck.fat and growpart (Debian: gdisk, fdisk, mtools, util-linux, dosfstools, cloud-guest-utils)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.runtime.seed import (
    DeviceError,
    NoSpace,
    SeedContent,
    SeedReport,
    TableError,
    TableType,
    write_seed,
)
from tests.tools import need

MiB = 1 << 20
TOOLS = ("sgdisk", "sfdisk", "mdir", "mcopy", "mlabel", "blkid", "fsck.fat", "growpart")


@pytest.fixture(autouse=True)
def _tools() -> None:
    need(*TOOLS)


SEED = SeedContent(
    user_data="#cloud-config\nhostname: node1\nruncmd:\n  - [touch, /run/seeded]\n",
    meta_data="instance-id: job-1\nlocal-hostname: node1\n",
    network_config="version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
)
WHEN = datetime(2024, 5, 6, 7, 8, 10, tzinfo=UTC)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def gpt_image(path: Path, size: int = 64 * MiB, target: int = 256 * MiB) -> Path:
    """An image with an EFI and a root partition filling it, written to a `target`-byte disk."""
    with open(path, "wb") as f:
        f.truncate(size)
    run("sgdisk", "-n1:1M:+32M", "-t1:ef00", "-c1:EFI", "-n2:0:0", "-t2:8300", "-c2:root", str(path))
    with open(path, "r+b") as f:
        f.truncate(target)
    return path


def mbr_image(path: Path, script: str, size: int = 64 * MiB, target: int = 256 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True, capture_output=True)
    with open(path, "r+b") as f:
        f.truncate(target)
    return path


def table(dev: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run("sfdisk", "--json", dev))["partitiontable"]
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_seed_fs(image: str, report: SeedReport, seed: SeedContent, tmp_path: Path) -> None:
    """Exactly the seed's files with their content, label CIDATA, a clean FAT."""
    at = f"{image}@@{report.start}"
    listing = run("mdir", "-b", "-i", at, "::")
    expected = {f.name: f.data for f in seed.files()}
    assert sorted(line.removeprefix("::/") for line in listing.split()) == sorted(expected)
    for name, data in expected.items():
        assert (
            subprocess.run(["mcopy", "-i", at, f"::{name}", "-"], check=True, capture_output=True).stdout
            == data
        )
    assert run("mlabel", "-i", at, "-s", "::").split() == ["Volume", "label", "is", "CIDATA"]
    probe = run("blkid", "-p", "-O", str(report.start), "-o", "export", image)
    assert "LABEL=CIDATA" in probe.split() and "TYPE=vfat" in probe.split()
    fs = tmp_path / "seed-fs.img"
    with open(image, "rb") as src:
        src.seek(report.start)
        fs.write_bytes(src.read(report.size))
    subprocess.run(["fsck.fat", "-n", str(fs)], check=True, capture_output=True)
    assert [(f.name, f.size) for f in report.files] == [(k, len(v)) for k, v in expected.items()]


def assert_sgdisk_ok(dev: str) -> None:
    out = run("sgdisk", "-v", dev)
    assert "No problems found" in out, out


def test_gpt_seed_then_growpart(tmp_path: Path) -> None:
    img = gpt_image(tmp_path / "disk.img")
    report = write_seed(str(img), SEED, now=WHEN)
    assert_sgdisk_ok(str(img))
    t = table(str(img))
    parts = t["partitions"]
    assert [p.get("name") for p in parts] == ["EFI", "root", "cidata"]
    seed = parts[2]
    assert seed["type"] == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
    assert seed["start"] + seed["size"] - 1 == t["lastlba"]  # ends at the end of the usable area
    assert (seed["start"] * 512, seed["size"] * 512) == (report.start, report.size)
    assert seed["start"] % 2048 == 0
    assert (report.table, report.partition, report.replaced) == (TableType.GPT, 3, False)
    check_seed_fs(str(img), report, SEED, tmp_path)

    out = run("growpart", str(img), "2")
    assert out.startswith("CHANGED"), out
    root = table(str(img))["partitions"][1]
    assert root["start"] + root["size"] == seed["start"]  # grown right up to the seed
    assert_sgdisk_ok(str(img))


def test_gpt_second_seed_replaces_the_first(tmp_path: Path) -> None:
    img = gpt_image(tmp_path / "disk.img")
    first = write_seed(str(img), SEED, now=WHEN)
    again = SeedContent("#cloud-config\n", "instance-id: job-2\n")
    second = write_seed(str(img), again, now=WHEN)
    assert second.replaced and (second.partition, second.start) == (first.partition, first.start)
    assert [p.get("name") for p in table(str(img))["partitions"]] == ["EFI", "root", "cidata"]
    assert_sgdisk_ok(str(img))
    check_seed_fs(str(img), second, again, tmp_path)


def test_mbr_seed_is_a_primary_partition_at_the_end(tmp_path: Path) -> None:
    img = mbr_image(tmp_path / "disk.img", "label: dos\n,32M,c,*\n,,83\n")
    report = write_seed(str(img), SEED, now=WHEN)
    assert (report.table, report.partition) == (TableType.MBR, 3)
    t = table(str(img))
    seed = t["partitions"][2]
    assert (seed["type"], seed["start"] + seed["size"]) == ("c", 256 * MiB // 512)
    assert "img3" in run("sfdisk", "-l", str(img))
    assert "No errors detected" in run("sfdisk", "-V", str(img))
    check_seed_fs(str(img), report, SEED, tmp_path)
    assert run("growpart", str(img), "2").startswith("CHANGED")
    root = table(str(img))["partitions"][1]
    assert root["start"] + root["size"] == seed["start"]
    second = write_seed(str(img), SEED, now=WHEN)
    assert second.replaced and second.partition == 3 and len(table(str(img))["partitions"]) == 3


def blank(path: Path) -> Path:
    path.write_bytes(bytes(4 * MiB))
    return path


REFUSALS: list[tuple[str, Callable[[Path], Path], type[Exception], str]] = [
    (
        "mbr-4-slots",
        lambda p: mbr_image(p, "label: dos\n,8M\n,8M\n,8M\n,8M\n", target=64 * MiB),
        TableError,
        "all 4 primary MBR entries are used",
    ),
    (
        "mbr-extended-to-the-end",
        lambda p: mbr_image(p, "label: dos\n,8M\n,,5\n", target=64 * MiB),
        TableError,
        "inside extended partition 2",
    ),
    (
        "mbr-root-to-the-end",
        lambda p: mbr_image(p, "label: dos\n,,83\n", target=64 * MiB),
        NoSpace,
        "after partition 1",
    ),
    ("gpt-root-to-the-end", lambda p: gpt_image(p, target=64 * MiB), NoSpace, "after partition 2"),
    (
        "gpt-backup-to-move-too-little-room",
        lambda p: gpt_image(p, target=66 * MiB),
        NoSpace,
        "after partition 2",
    ),
    ("no-table", blank, TableError, "no partition table"),
]


@pytest.mark.parametrize(
    ("make", "error", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_leave_the_disk_byte_identical(
    tmp_path: Path, make: Callable[[Path], Path], error: type[Exception], message: str
) -> None:
    img = make(tmp_path / "disk.img")
    before = digest(img)
    with pytest.raises(error, match=message) as info:
        write_seed(str(img), SEED, now=WHEN)
    assert str(img) in str(info.value)
    assert digest(img) == before


def test_not_a_device(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="expected a block device or a regular file"):
        write_seed(str(tmp_path), SEED)
    with pytest.raises(DeviceError, match="cannot open"):
        write_seed(str(tmp_path / "missing"), SEED)


@pytest.fixture
def loop_4k(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "disk4k.img"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
    dev = run("losetup", "-f", "--show", "--sector-size", "4096", str(backing)).strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_gpt_seed_on_4096_byte_sectors(loop_4k: tuple[str, Path], tmp_path: Path) -> None:
    dev, backing = loop_4k
    run("sgdisk", "-n1:1M:+32M", "-t1:ef00", "-c1:EFI", "-n2:0:+31M", "-t2:8300", "-c2:root", dev)
    report = write_seed(dev, SEED, now=WHEN)
    assert_sgdisk_ok(dev)
    t = table(dev)
    assert t["sectorsize"] == 4096
    seed = t["partitions"][2]
    assert seed["name"] == "cidata" and seed["start"] + seed["size"] - 1 == t["lastlba"]
    assert seed["start"] * 4096 == report.start and report.start % MiB == 0
    check_seed_fs(str(backing), report, SEED, tmp_path)
    probe = run("blkid", "-p", "-O", str(report.start), "-o", "export", str(backing))
    assert "BLOCK_SIZE=4096" in probe.split()  # FAT sectors match the disk's: Linux needs that to mount
    assert run("growpart", dev, "2").startswith("CHANGED")
    root = table(dev)["partitions"][1]
    assert root["start"] + root["size"] == seed["start"]
    second = write_seed(dev, SEED, now=WHEN)
    assert second.replaced and len(table(dev)["partitions"]) == 3
    assert_sgdisk_ok(dev)


@pytest.mark.root
def test_gpt_seed_on_a_loop_device(loop_device: Any, tmp_path: Path) -> None:
    dev = loop_device(256 * MiB, direct_io=False)
    image = gpt_image(tmp_path / "image.img", target=64 * MiB)
    with open(dev, "r+b") as out:
        out.write(image.read_bytes())
    report = write_seed(dev, SEED, now=WHEN)
    assert_sgdisk_ok(dev)
    assert [p.get("name") for p in table(dev)["partitions"]] == ["EFI", "root", "cidata"]
    backing = run("losetup", "-n", "-O", "BACK-FILE", dev).strip()
    check_seed_fs(backing, report, SEED, tmp_path)
