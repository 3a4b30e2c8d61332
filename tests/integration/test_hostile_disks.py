"""A disk the previous tenant prepared (issue 19), on loop devices and image files, checked with
the real tools: erase leaves no signature `blkid -p` or `wipefs -n` finds and changes nothing outside
its ranges; the backup move never zeroes a sector a header merely names; the seed refuses lying
tables and keeps a partition it cannot prove is its own; verify fails on any table change."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import protocol as p
from agent.disk.gpt import seal_header
from agent.disk.tables import read_tables
from agent.runtime.jobs.erase import erase, metadata_ranges, table_spans
from agent.runtime.machine import FakeMachine
from agent.runtime.seed import NoSpace, SeedContent, TableError, write_seed
from agent.writer.pipeline import WriteOptions
from agent.writer.sources import DirectorySource
from tests.bounded import bounded
from tests.integration.test_erase import context
from tests.integration.test_writer import make_store, write
from tests.tools import need

MiB = 1 << 20
LoopFactory = Callable[..., str]
SEED = SeedContent("#cloud-config\n", "instance-id: i-1\n")


@pytest.fixture(autouse=True)
def tools() -> None:
    need("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.vfat", "blkid", "wipefs")


def run(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, input=stdin).stdout


def blkid(dev: str, offset: int = 0) -> str:
    cmd = ["blkid", "-p", "-o", "export", *(["-O", str(offset)] if offset else []), dev]
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def mkfs_at(path: str, offset: int, size: int, kind: str = "ext4") -> None:
    """A filesystem at a byte offset (this kernel parses no tables: no partition nodes)."""
    if kind == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", f"offset={offset}", path, f"{size // 1024}k")
    else:
        run("mkfs.vfat", "-I", "--offset", str(offset // 512), "-n", "TENANT", path, str(size // 1024))
    assert f"TYPE={'ext4' if kind == 'ext4' else 'vfat'}" in blkid(path, offset)


def patch_header(path: str, lba: int, **fields: int) -> None:
    """Set GPT header fields at `lba` and fix its CRC (and the array's, if asked), as a forger does."""
    offsets = {
        "my_lba": (24, "<Q"),
        "alt_lba": (32, "<Q"),
        "first_usable": (40, "<Q"),
        "entries_lba": (72, "<Q"),
    }
    with open(path, "r+b") as f:
        f.seek(lba * 512)
        hdr = bytearray(f.read(512))
        for name, value in fields.items():
            at, fmt = offsets[name]
            struct.pack_into(fmt, hdr, at, value)
        seal_header(hdr, 92)
        f.seek(lba * 512)
        f.write(hdr)


def fix_array_crc(path: str, lba: int) -> None:
    with open(path, "r+b") as f:
        f.seek(lba * 512)
        hdr = bytearray(f.read(512))
        entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
        f.seek(entries_lba * 512)
        struct.pack_into("<I", hdr, 88, zlib.crc32(f.read(count * size)))
        seal_header(hdr, 92)
        f.seek(lba * 512)
        f.write(hdr)


def pattern(dev: str, size: int) -> None:
    with open(dev, "r+b") as f:
        for _ in range(0, size, MiB):
            f.write(bytes([0xA5]) * MiB)


def read_all(dev: str) -> bytes:
    with open(dev, "rb") as f:
        return f.read()


# erase (item 1) ----------------------------------------------------------------------------------

DISK = 128 * MiB
FAR = 48 * MiB  # a partition start far from both 16 MiB edges the erase always clears


def gpt_array_at_2048(dev: str) -> list[int]:
    run("sgdisk", "-j", "2048", "-n", f"1:{FAR // 512}:+8M", dev)
    return [FAR]


def gpt_slot_300(dev: str) -> list[int]:
    run("sgdisk", "-S", "512", "-n", f"300:{FAR // 512}:+8M", dev)
    return [FAR]


def gpt_primary_zeroed(dev: str) -> list[int]:
    run("sgdisk", "-n", f"1:{FAR // 512}:+8M", dev)
    with open(dev, "r+b") as f:
        f.seek(512)
        f.write(bytes(512))
    return [FAR]


def gpt_primary_bad_crc(dev: str) -> list[int]:
    run("sgdisk", "-n", f"1:{FAR // 512}:+8M", dev)
    with open(dev, "r+b") as f:
        f.seek(512 + 40)
        f.write(b"\xff")
    return [FAR]


def mbr_logical(dev: str) -> list[int]:
    script = f"label: dos\nstart=2048, size=8192, type=83\nstart={32 * MiB // 512}, type=5\n"
    for start in (FAR, 70 * MiB):
        script += f"start={start // 512}, size={8 * MiB // 512}, type=83\n"
    run("sfdisk", "-q", dev, stdin=script)
    return [FAR, 70 * MiB]


def gpt_backup_in_the_middle(dev: str) -> list[int]:
    """An image built for a 64 MiB disk on a 128 MiB one: its backup sits at 64 MiB."""
    run("sgdisk", "-n", f"1:{FAR // 512}:+8M", dev)
    with open(dev, "r+b") as f:
        f.seek(DISK - 512)
        f.write(bytes(512))  # only the middle copy is left
    patch_header(dev, 1, alt_lba=64 * MiB // 512 - 1)
    with open(dev, "r+b") as f:
        f.seek(512)
        hdr = bytearray(f.read(512))
    backup = bytearray(hdr)
    struct.pack_into("<QQ", backup, 24, 64 * MiB // 512 - 1, 1)
    struct.pack_into("<Q", backup, 72, 64 * MiB // 512 - 33)
    seal_header(backup, 92)
    with open(dev, "r+b") as f:
        f.seek(1024)
        array = f.read(16384)
        f.seek(64 * MiB - 512 - 16384)
        f.write(array + bytes(backup))
    return [FAR]


@pytest.mark.root
@pytest.mark.parametrize(
    "prepare",
    [
        gpt_array_at_2048,
        gpt_slot_300,
        gpt_primary_zeroed,
        gpt_primary_bad_crc,
        mbr_logical,
        gpt_backup_in_the_middle,
    ],
)
def test_metadata_erase_leaves_no_signature_and_touches_only_its_ranges(
    loop_device: LoopFactory, prepare: Callable[[str], list[int]]
) -> None:
    dev = loop_device(DISK)
    pattern(dev, DISK)
    starts = prepare(dev)
    for start in starts:
        mkfs_at(dev, start, 8 * MiB, "ext4" if start == FAR else "vfat")
    headers = [
        lba
        for lba in (1, DISK // 512 - 1, 64 * MiB // 512 - 1)
        if read_all(dev)[lba * 512 : lba * 512 + 8] == b"EFI PART"
    ]
    before = read_all(dev)
    fd = os.open(dev, os.O_RDONLY)
    try:
        listed, structures = table_spans(read_tables(lambda o, n: os.pread(fd, n, o), DISK, 512))
    finally:
        os.close(fd)
    assert {s for s, _ in listed} >= set(starts)
    ranges = metadata_ranges(DISK, listed, structures)

    def job() -> None:
        ctx, _ = context([dev], p.EraseMode.METADATA)
        # only the tables on the disk tell where partitions are: a loop device here may keep
        # partitions another test added with partx, whose erase would hide a miss
        inventory = ctx.machine.inventory()
        disks = tuple(dataclasses.replace(d, partitions=()) for d in inventory.disks)
        ctx = dataclasses.replace(ctx, machine=FakeMachine(dataclasses.replace(inventory, disks=disks)))
        outcome = erase(ctx)
        assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message

    cost = bounded(job, seconds=60, mib=100)
    after = read_all(dev)
    for start in starts:
        assert blkid(dev, start) == "", start
    assert blkid(dev) == ""
    assert subprocess.run(["wipefs", "-n", dev], capture_output=True, text=True).stdout == ""
    for lba in headers:
        assert after[lba * 512 : lba * 512 + 512] == bytes(512), f"GPT header at LBA {lba} survived"
    pos = 0
    for off, n in ranges:
        assert after[pos:off] == before[pos:off], f"bytes {pos}-{off} changed outside the erase ranges"
        assert after[off : off + n].count(0) == n
        pos = off + n
    assert after[pos:] == before[pos:]
    assert cost.seconds < 30


# the backup move (items 2, 3) and verify (item 8) ---------------------------------------------


def gpt_image(tmp_path: Path, size: int = 16 * MiB) -> Path:
    src = tmp_path / "gpt.img"
    with open(src, "wb") as f:
        f.truncate(size)
    run("sgdisk", "-n", "1:2048:+4M", "-t", "1:ef00", "-n", "2:0:0", str(src))
    with open(src, "r+b") as f:  # content in both partitions, so a zeroed sector shows
        f.seek(MiB)
        f.write(b"\x5a" * 4 * MiB)
        f.seek(6 * MiB)
        f.write(b"\x3c" * 4 * MiB)
    return src


def sgdisk_ok(dev: str) -> bool:
    return "No problems found" in subprocess.run(["sgdisk", "-v", dev], capture_output=True, text=True).stdout


def verify_cli(root: Path, digest: str, dev: str) -> subprocess.CompletedProcess[str]:
    manifest = str(root / "manifests" / digest)
    cmd = [sys.executable, "-m", "agent.cli", "verify", "--manifest", manifest, "--device", dev]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.root
def test_item2_an_alternate_lba_inside_partition_1_is_never_zeroed(
    tmp_path: Path, loop_device: LoopFactory
) -> None:
    src = gpt_image(tmp_path)
    patch_header(str(src), 1, alt_lba=3000)  # inside partition 1, CRC fixed
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(64 * MiB)
    report = write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
    assert not report.gpt_relocated
    assert read_all(dev)[: 16 * MiB] == src.read_bytes()  # sector 3000 holds the image's bytes
    assert verify_cli(root, digest, dev).returncode == 0


@pytest.mark.root
def test_item2_alternate_lba_0_on_a_hybrid_mbr_keeps_the_mbr(
    tmp_path: Path, loop_device: LoopFactory
) -> None:
    src = gpt_image(tmp_path)
    run("sgdisk", "-h", "1", str(src))
    patch_header(str(src), 1, alt_lba=0)
    mbr = src.read_bytes()[:512]
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(64 * MiB)
    report = write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
    assert not report.gpt_relocated and read_all(dev)[:512] == mbr and mbr[510:512] == b"\x55\xaa"


@pytest.mark.root
def test_item3_a_strangers_backup_at_the_disks_end_is_replaced(
    tmp_path: Path, loop_device: LoopFactory
) -> None:
    dev = loop_device(64 * MiB)
    run("sgdisk", "-n", "1:2048:+40M", "-c", "1:tenant", dev)  # the tenant's table, backup at the end
    src = tmp_path / "img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    run("sgdisk", "-n", "1:2048:+4M", "-n", "2:0:+4M", str(src))  # built for this very disk size
    with open(src, "r+b") as f:
        f.truncate(16 * MiB)  # but shipped cut short: its primary names the disk's end
    root, manifest, digest = make_store(tmp_path, src)
    report = write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
    assert report.gpt_relocated and report.verified
    assert sgdisk_ok(dev)
    assert "tenant" not in run("sgdisk", "-p", dev)
    assert verify_cli(root, digest, dev).returncode == 0


def tamper_root_entry(dev: str) -> None:
    """The root entry now ends past the image, both arrays and all CRCs fixed."""
    size = 64 * MiB
    with open(dev, "r+b") as f:
        for array in (1024, size - 512 - 16384):
            f.seek(array + 128 + 40)
            f.write(struct.pack("<Q", size // 512 - 40))
    fix_array_crc(dev, 1)
    fix_array_crc(dev, size // 512 - 1)


def garbage_in_lba1(dev: str) -> None:
    with open(dev, "r+b") as f:
        f.seek(512 + 200)
        f.write(b"junk")


def mbr_entry_changed(dev: str) -> None:
    with open(dev, "r+b") as f:
        f.seek(446 + 16 + 4)
        f.write(b"\x83")
        f.seek(446 + 16 + 8)
        f.write(struct.pack("<II", 4096, 100))


def backup_field_changed(dev: str) -> None:
    patch_header(dev, 64 * MiB // 512 - 1, first_usable=40)


@pytest.mark.root
@pytest.mark.parametrize(
    "tamper", [tamper_root_entry, garbage_in_lba1, mbr_entry_changed, backup_field_changed]
)
def test_item8_verify_fails_on_any_table_change_sledge_did_not_make(
    tmp_path: Path, loop_device: LoopFactory, tamper: Callable[[str], None]
) -> None:
    src = gpt_image(tmp_path)
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(64 * MiB)
    report = write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
    assert report.gpt_relocated
    write_seed(dev, SEED)  # a seed entry too: sledge's own edit, not drift
    held = verify_cli(root, digest, dev)
    assert held.returncode == 0, held.stdout + held.stderr
    assert "cloud-init seed" in held.stdout
    tamper(dev)
    drifted = verify_cli(root, digest, dev)
    assert drifted.returncode == 1, drifted.stdout + drifted.stderr
    assert "Traceback" not in drifted.stderr
    assert "does not hold the image" in drifted.stderr


# the seed (items 4, 6, 7) ---------------------------------------------------------------------


def seed_image(tmp_path: Path) -> Path:
    path = tmp_path / "seed.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    run("sgdisk", "-n", "1:2048:+16M", str(path))
    return path


@pytest.mark.parametrize(
    "fields",
    [{"my_lba": 2}, {"entries_lba": 0}, {"first_usable": 1}, {"alt_lba": 5000}],
)
def test_item4_the_seed_refuses_a_lying_header_and_writes_nothing(
    tmp_path: Path, fields: dict[str, int]
) -> None:
    path = seed_image(tmp_path)
    patch_header(str(path), 1, **fields)
    before = path.read_bytes()
    with pytest.raises(TableError, match="the primary GPT is not trusted"):
        write_seed(str(path), SEED)
    assert path.read_bytes() == before


def test_item6_a_partition_named_cidata_holding_ext4_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "fake.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    run("sgdisk", "-n", "1:2048:+16M", "-n", "2:-8M:0", "-c", "2:cidata", str(path))
    start = int(run("sgdisk", "-i", "2", str(path)).split("First sector: ")[1].split()[0]) * 512
    mkfs_at(str(path), start, 4 * MiB)
    before = path.read_bytes()
    with pytest.raises(NoSpace, match="after partition 2"):
        write_seed(str(path), SEED)
    assert path.read_bytes() == before
    assert "TYPE=ext4" in blkid(str(path), start)
    # a real sledge seed in the same place is replaced
    run("sgdisk", "-d", "2", str(path))
    first = write_seed(str(path), SEED)
    again = write_seed(str(path), SEED)
    assert again.replaced and again.partition == first.partition


def test_item7_a_tiny_disk_with_only_the_mbr_signature(tmp_path: Path) -> None:
    path = tmp_path / "tiny.img"
    path.write_bytes(bytes(510) + b"\x55\xaa" + bytes(3 * MiB - 512))
    with pytest.raises(NoSpace, match="an empty table"):
        write_seed(str(path), SEED)
    assert path.read_bytes() == bytes(510) + b"\x55\xaa" + bytes(3 * MiB - 512)
