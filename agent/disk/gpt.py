"""Moving a GPT's backup header and table to the end of a larger disk (what `sgdisk -e` does).

An image built for an N-byte disk keeps its backup GPT at byte N; written to a
bigger disk, that backup sits in the middle and firmware and tools report a
damaged table. The plan is pure and works from the careful reader's view of the
disk (agent.disk.tables): only a primary with no problem at all is moved; the
backup is written where the disk ends whenever what is there is not exactly the
primary's mirror (a stranger's old backup at the end is replaced too); and the old
backup header is cleared only where a real one is (signature, CRC, MyLBA), never a
sector a header field merely names.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from agent.disk.tables import SIGNATURE, Tables, header_crc, read_tables

__all__ = [
    "SIGNATURE",
    "Relocation",
    "fix_backup_gpt",
    "gpt_entries_extent",
    "is_gpt",
    "relocate",
    "seal_header",
]


@dataclass(frozen=True)
class Relocation:
    writes: list[tuple[int, bytes]]  # (byte offset, data)
    cleared: int | None  # LBA of the old backup header cleared, if any


def is_gpt(head: bytes, sector: int) -> bool:
    """Whether LBA 1 of `head` (the disk's first bytes) holds a GPT header signature."""
    return head[sector : sector + 8] == SIGNATURE


def gpt_entries_extent(head: bytes, sector: int) -> tuple[int, int]:
    """(byte offset, length) of the primary entry array named by the header in LBA 1 (unchecked)."""
    entries_lba, count, entry_size = struct.unpack_from("<QII", head, sector + 72)
    return entries_lba * sector, count * entry_size


def seal_header(header: bytearray, size: int) -> None:
    """Write the header's CRC32 (over its first `size` bytes, CRC field zeroed)."""
    struct.pack_into("<I", header, 16, header_crc(bytes(header), size))


def backup_of(primary: bytes, alt_lba: int, entries_lba: int) -> bytes:
    """The backup header mirroring a sealed primary: MyLBA and AlternateLBA swapped, its own array."""
    (size,) = struct.unpack_from("<I", primary, 12)
    backup = bytearray(primary)
    struct.pack_into("<QQ", backup, 24, alt_lba, 1)
    struct.pack_into("<Q", backup, 72, entries_lba)
    seal_header(backup, size)
    return bytes(backup)


def relocate(tables: Tables) -> Relocation | None:
    """The writes that make the disk's backup GPT the primary's mirror at the disk's end.

    None when there is nothing to do or nothing trustworthy to do it from (no primary, or one
    with any problem: its fields would decide where sledge writes).
    """
    copy = tables.primary
    if copy is None or not copy.valid or copy.entries is None:
        return None
    h, sector = copy.header, tables.sector
    new_alt = tables.sectors - 1
    n = h.array_sectors(sector)
    backup_entries_lba = new_alt - n
    header = bytearray(h.raw)
    if h.alt_lba != new_alt:
        struct.pack_into("<Q", header, 32, new_alt)
        struct.pack_into("<Q", header, 48, backup_entries_lba - 1)  # the usable area grows to the new array
        seal_header(header, h.size)
    backup = backup_of(bytes(header), new_alt, backup_entries_lba)
    padded = copy.entries + bytes(n * sector - h.array_bytes)
    have = tables.backup
    if (
        h.alt_lba == new_alt
        and have is not None
        and have.header.lba == new_alt
        and have.header.raw == backup
        and have.entries == copy.entries
        and have.header.entries_lba == backup_entries_lba
    ):
        return None  # already the mirror, where it belongs
    writes = [(backup_entries_lba * sector, padded), (new_alt * sector, backup)]
    if bytes(header) != h.raw:
        writes.append((sector, bytes(header)))
    cleared = None
    if h.alt_lba != new_alt and tables.real_header_at(h.alt_lba):
        cleared = h.alt_lba
        writes.insert(0, (h.alt_lba * sector, bytes(sector)))  # the stale backup header, and only it
    if tables.mbr is not None:
        new_mbr = _grow_protective_mbr(tables.mbr.raw, tables.sectors)
        if new_mbr is not None:
            writes.append((0, new_mbr))
    return Relocation(writes, cleared)


def _grow_protective_mbr(mbr: bytes, disk_sectors: int) -> bytes | None:
    out = bytearray(mbr)
    types = [out[446 + 16 * i + 4] for i in range(4)]
    if sum(1 for t in types if t != 0) != 1:
        return None  # a hybrid MBR (other entries beside 0xEE): grown, 0xEE would overlap them
    for i in range(4):
        entry = 446 + 16 * i
        if out[entry + 4] == 0xEE:
            (start,) = struct.unpack_from("<I", out, entry + 8)
            if start != 1:
                return None  # not the protective entry sledge knows how to grow
            size = min(disk_sectors - start, 0xFFFFFFFF)
            struct.pack_into("<I", out, entry + 12, size)
            return bytes(out) if bytes(out) != mbr else None
    return None


def fix_backup_gpt(fd: int, sector: int, disk_size: int) -> bool:
    """Relocate the backup GPT on an open device; True if anything was written."""
    tables = read_tables(lambda offset, length: os.pread(fd, length, offset), disk_size, sector)
    plan = relocate(tables)
    if plan is None:
        return False
    for offset, data in plan.writes:
        os.pwrite(fd, data, offset)
    os.fsync(fd)
    return True
