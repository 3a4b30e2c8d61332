"""Drift classification: differences confined to the table sectors sledge rewrites are not drift."""

from __future__ import annotations

import struct

from agent.image.manifest import Chunk, ChunkKind, Encoding
from agent.writer.drift import classify, only_in, table_ranges

MiB = 1 << 20


def chunk(index: int, size: int = MiB) -> Chunk:
    return Chunk(index, index * size, size, b"\0" * 32, ChunkKind.DATA, Encoding.RAW, size)


def gpt_head(sector: int = 512, image_size: int = 4 * MiB, backup_at: int | None = None) -> bytes:
    """An image's first MiB: protective MBR, a GPT header naming 128 entries of 128 bytes at LBA 2
    and its backup at the image's last LBA (or at `backup_at` bytes, an image grown after)."""
    head = bytearray(MiB)
    head[510:512] = b"\x55\xaa"
    head[sector : sector + 8] = b"EFI PART"
    alt = (backup_at if backup_at is not None else image_size) // sector - 1
    struct.pack_into("<Q", head, sector + 32, alt)
    struct.pack_into("<QII", head, sector + 72, 2, 128, 128)
    return bytes(head)


def test_table_ranges_of_gpt_mbr_and_bare_images() -> None:
    size = 64 * MiB
    assert table_ranges(gpt_head(512, size), size) == [
        (446, 512),  # the MBR's entries, not its boot code
        (512, 1024),  # primary header
        (1024, 1024 + 16384),  # primary entries
        (size - 512 - 16384, size),  # backup entries and header
    ]
    assert table_ranges(gpt_head(4096, size), size) == [
        (446, 512),
        (4096, 8192),
        (8192, 8192 + 16384),
        (size - 4096 - 16384, size),
    ]
    # grown after partitioning: the backup is where the header says, not at the image's end
    assert table_ranges(gpt_head(512, size, backup_at=32 * MiB), size)[-1] == (
        32 * MiB - 512 - 16384,
        32 * MiB,
    )
    mbr = bytearray(MiB)
    mbr[510:512] = b"\x55\xaa"
    assert table_ranges(bytes(mbr), 64 * MiB) == [(440, 512)]
    assert table_ranges(bytes(MiB), 64 * MiB) == []


def test_only_in_masks_exactly_the_ranges() -> None:
    image = bytes(range(256)) * (MiB // 256)
    c = chunk(0)
    disk = bytearray(image)
    disk[600] ^= 1  # inside [512, 1024)
    assert only_in([(512, 1024)], c, bytes(disk), image)
    disk[1024] ^= 1  # just outside
    assert not only_in([(512, 1024)], c, bytes(disk), image)
    last = chunk(3)
    disk2 = bytearray(image)
    disk2[-1] ^= 1
    assert only_in([(4 * MiB - 512, 4 * MiB)], last, bytes(disk2), image)


def test_classify_splits_table_edits_from_drift() -> None:
    head = gpt_head()
    size = 4 * MiB
    image = {i: (head if i == 0 else bytes([i]) * MiB) for i in range(4)}
    disk = dict(image)
    d0 = bytearray(head)
    d0[512 + 32] ^= 0xFF  # the header's alternate LBA: rewritten by the GPT move
    disk[0] = bytes(d0)
    d3 = bytearray(image[3])
    d3[-100] = 0  # the old backup header cleared
    disk[3] = bytes(d3)
    d2 = bytearray(image[2])
    d2[5] = 0xEE  # real drift in the middle
    disk[2] = bytes(d2)
    bad = [chunk(0), chunk(2), chunk(3)]
    result = classify(bad, size, head, lambda c: disk[c.index], lambda c: image[c.index])
    assert [c.index for c in result.drifted] == [2]
    assert [c.index for c in result.table_only] == [0, 3]
    for where in (20000, 100):  # past the primary table, or in the MBR's boot code: drift
        d0b = bytearray(d0)
        d0b[where] ^= 1
        disk[0] = bytes(d0b)
        result = classify(bad, size, head, lambda c: disk[c.index], lambda c: image[c.index])
        assert [c.index for c in result.drifted] == [0, 2], where


def test_a_range_starting_before_the_chunk_is_clipped() -> None:
    image = bytes(2 * MiB)
    c = chunk(1)
    disk = bytearray(MiB)
    disk[10] = 1
    assert only_in([(MiB - 512, MiB + 512)], c, bytes(disk), image[MiB:])
    disk[600] = 1
    assert not only_in([(MiB - 512, MiB + 512)], c, bytes(disk), image[MiB:])
