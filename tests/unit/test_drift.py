"""Drift: only sledge's own table edits (backup moved, seed added), replayed on the image's bytes
and matched byte for byte, are not drift; any other change to a table sector is (issue 19, item 8)."""

from __future__ import annotations

import copy
import struct
import zlib

from agent.disk.expect import Edit, apply, same_outside, sledge_edits
from agent.disk.gpt import relocate, seal_header
from agent.disk.seedplan import plan_seed, seed_candidates
from agent.disk.tables import read_tables
from agent.image.manifest import Chunk, ChunkKind, Encoding
from agent.writer.drift import Drift, classify
from tests.diskbytes import Disk, Part, gpt_disk, mbr_disk

MiB = 1 << 20
IMAGE = 4 * MiB
DISK = 8 * MiB


def chunk(index: int, size: int = MiB) -> Chunk:
    return Chunk(index, index * size, size, b"\0" * 32, ChunkKind.DATA, Encoding.RAW, size)


def image() -> Disk:
    img = gpt_disk(IMAGE, 512, [Part(2048, 4095, "efi"), Part(4096, IMAGE // 512 - 34, "root")])
    img.write(3 * MiB, b"root filesystem bytes".ljust(512, b"."))
    img.write(3000 * 512, b"efi bytes".ljust(512, b"."))
    return img


def deployed(img: Disk) -> Disk:
    """The image written to a bigger disk, then the backup moved as the writer does."""
    disk = Disk(DISK, 512)
    disk.blocks = copy.deepcopy(img.blocks)
    plan = relocate(read_tables(disk.read, DISK, 512))
    assert plan is not None
    for offset, data in plan.writes:
        disk.write(offset, data)
    return disk


def drift(img: Disk, disk: Disk) -> Drift:
    chunks = [chunk(i) for i in range(IMAGE // MiB)]
    bad = [c for c in chunks if disk.read(c.offset, c.length) != img.read(c.offset, c.length)]
    edits = sledge_edits(img.read, IMAGE, disk.read, DISK, 512)
    return classify(
        bad,
        edits,
        IMAGE,
        512,
        lambda c: disk.read(c.offset, c.length),
        lambda c: img.read(c.offset, c.length),
        disk.read,
    )


def fix_crcs(disk: Disk, header_lba: int) -> None:
    hdr = bytearray(disk.read(header_lba * 512, 512))
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    struct.pack_into("<I", hdr, 88, zlib.crc32(disk.read(entries_lba * 512, count * size)))
    seal_header(hdr, 92)
    disk.write(header_lba * 512, bytes(hdr))


def test_the_moved_backup_is_not_drift() -> None:
    img = image()
    result = drift(img, deployed(img))
    assert result.clean and [c.index for c in result.table_only] == [0, 3]
    assert result.edit == "backup GPT moved to the disk's end"


def test_an_untouched_image_and_a_seed_are_not_drift() -> None:
    img = image()
    disk = Disk(DISK, 512)
    disk.blocks = copy.deepcopy(img.blocks)
    assert drift(img, disk).clean and drift(img, disk).edit == "as written"
    tables = read_tables(disk.read, DISK, 512)
    placement = plan_seed(tables, 2 * MiB, guid_seed=b"x")
    disk.apply(placement)
    result = drift(img, disk)
    assert result.clean, result
    assert result.edit.startswith("cloud-init seed in partition 3")


def test_a_root_entry_pointed_elsewhere_with_crcs_fixed_is_drift() -> None:
    img = image()
    disk = deployed(img)
    entries = bytearray(disk.read(1024, 128 * 128))
    struct.pack_into("<Q", entries, 128 + 40, DISK // 512 - 40)  # root now ends past the image
    disk.write(1024, bytes(entries))
    disk.write(DISK - 512 - 128 * 128, bytes(entries))
    fix_crcs(disk, 1)
    fix_crcs(disk, DISK // 512 - 1)
    assert read_tables(disk.read, DISK, 512).primary.valid  # type: ignore[union-attr]
    result = drift(img, disk)
    assert not result.clean and 0 in [c.index for c in result.drifted]


def test_garbage_in_lba1_a_changed_mbr_entry_or_boot_code_is_drift() -> None:
    img = image()
    for offset, data in ((600, b"junk"), (446 + 16 + 4, b"\x83"), (100, b"boot")):
        disk = deployed(img)
        disk.write(
            offset // 512 * 512,
            apply(disk.read(offset // 512 * 512, 512), offset // 512 * 512, [(offset, data)]),
        )
        assert [c.index for c in drift(img, disk).drifted] == [0], offset


def test_a_backup_past_the_image_that_is_not_the_mirror_is_drift() -> None:
    img = image()
    disk = deployed(img)
    backup = bytearray(disk.read(DISK - 512, 512))
    struct.pack_into("<Q", backup, 48, DISK // 512 - 100)  # LastUsableLBA shrunk
    seal_header(backup, 92)
    disk.write(DISK - 512, bytes(backup))
    result = drift(img, disk)
    assert not result.clean and result.drifted == []
    assert any("last_usable 16284 (sledge wrote 16350)" in p for p in result.tables), result.tables


def test_an_image_whose_header_points_its_backup_into_a_partition_is_compared_as_written() -> None:
    img = image()
    hdr = bytearray(img.read(512, 512))
    struct.pack_into("<Q", hdr, 32, 3000)  # AlternateLBA inside partition 1
    seal_header(hdr, 92)
    img.write(512, bytes(hdr))
    assert relocate(read_tables(img.read, DISK, 512)) is None  # never trusted, nothing moved
    disk = Disk(DISK, 512)
    disk.blocks = copy.deepcopy(img.blocks)
    edits = sledge_edits(img.read, IMAGE, disk.read, DISK, 512)
    assert [e.name for e in edits] == ["as written"]
    disk.write(3000 * 512, bytes(512))  # what the old writer did: zero the named sector
    assert [c.index for c in drift(img, disk).drifted] == [1]


def test_mbr_seed_replay() -> None:
    img = mbr_disk(IMAGE, [(0x83, 2048, IMAGE // 512 - 2048)])
    disk = Disk(DISK, 512)
    disk.blocks = copy.deepcopy(img.blocks)
    disk.apply(plan_seed(read_tables(disk.read, DISK, 512), 2 * MiB))
    chunks = [chunk(i) for i in range(IMAGE // MiB)]
    edits = sledge_edits(img.read, IMAGE, disk.read, DISK, 512)
    assert [e.name for e in edits][-1] == "cloud-init seed in partition 2"
    result = classify(
        [chunks[0]], edits, IMAGE, 512, lambda c: disk.read(0, MiB), lambda c: img.read(0, MiB), disk.read
    )
    assert result.clean
    e = bytearray(disk.read(0, 512))
    e[446 + 16 + 8] ^= 8  # the seed entry's start moved
    disk.write(0, bytes(e))
    result = classify(
        [chunks[0]], edits, IMAGE, 512, lambda c: disk.read(0, MiB), lambda c: img.read(0, MiB), disk.read
    )
    assert [c.index for c in result.drifted] == [0]
    assert seed_candidates(read_tables(img.read, IMAGE, 512)) == []


def test_apply_and_same_outside_clip_at_the_edges() -> None:
    data = bytes(1024)
    assert apply(data, 1024, [(1000, b"abcdefghijklmnopqrstuvwxyz0")])[:3] == b"yz0"
    assert apply(data, 1024, [(2040, b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")])[-8:] == b"x" * 8
    a, b = bytearray(1024), bytearray(1024)
    b[10] = 1
    assert same_outside(bytes(a), bytes(b), 4096, [(4096, 4100), (4106, 4111)])
    assert not same_outside(bytes(a), bytes(b), 4096, [(4096, 4106)])
    assert Edit("as written", ()).writes == ()
