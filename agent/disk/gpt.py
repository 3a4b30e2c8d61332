"""Moving a GPT's backup header and table to the end of a larger disk (what `sgdisk -e` does).

An image built for an N-byte disk keeps its backup GPT at byte N; written to a
bigger disk, that backup sits in the middle and firmware and tools report a
damaged table. The pure part (relocate) rewrites the headers; the I/O part reads
and writes a handful of sectors.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

SIGNATURE = b"EFI PART"


@dataclass(frozen=True)
class Relocation:
    writes: list[tuple[int, bytes]]  # (byte offset, data)


def is_gpt(head: bytes, sector: int) -> bool:
    """Whether LBA 1 of `head` (the disk's first bytes) holds a GPT header."""
    return head[sector : sector + 8] == SIGNATURE


def gpt_entries_extent(head: bytes, sector: int) -> tuple[int, int]:
    """(byte offset, length) of the primary entry array named by the header in LBA 1."""
    entries_lba, count, entry_size = struct.unpack_from("<QII", head, sector + 72)
    return entries_lba * sector, count * entry_size


def gpt_partitions(head: bytes, sector: int, limit: int = 512) -> list[tuple[int, int]]:
    """(first LBA, last LBA) of the used entries of the primary array held in `head`."""
    offset, _ = gpt_entries_extent(head, sector)
    count, entry_size = struct.unpack_from("<II", head, sector + 80)
    used = []
    for i in range(min(count, limit)):
        entry = head[offset + i * entry_size : offset + i * entry_size + 56]
        if len(entry) < 56 or entry[:16] == bytes(16):  # short, or an empty slot (no type GUID)
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last >= first:
            used.append((first, last))
    return used


def seal_header(header: bytearray, size: int) -> None:
    """Write the header's CRC32 (over its first `size` bytes, CRC field zeroed)."""
    header[16:20] = b"\0\0\0\0"
    header[16:20] = struct.pack("<I", zlib.crc32(bytes(header[:size])) & 0xFFFFFFFF)


def relocate(mbr: bytes, primary: bytes, entries: bytes, sector: int, disk_sectors: int) -> Relocation | None:
    """Given LBA0, LBA1 and the primary entry array, the writes that put the backup at the end.

    None when there is no valid GPT or it already ends at the disk's end.
    """
    if primary[:8] != SIGNATURE:
        return None
    (hsize,) = struct.unpack_from("<I", primary, 12)
    if not 92 <= hsize <= sector:
        return None
    header = bytearray(primary[:sector])
    (crc,) = struct.unpack_from("<I", header, 16)
    check = bytearray(header)
    seal_header(check, hsize)
    if struct.unpack_from("<I", check, 16)[0] != crc:
        return None
    my_lba, alt_lba = struct.unpack_from("<QQ", header, 24)
    count, entry_size, entries_crc = struct.unpack_from("<III", header, 80)
    table_bytes = count * entry_size
    if zlib.crc32(entries[:table_bytes]) & 0xFFFFFFFF != entries_crc:
        return None
    new_alt = disk_sectors - 1
    if alt_lba == new_alt:
        return None
    table_sectors = -(-table_bytes // sector)
    backup_entries_lba = new_alt - table_sectors
    new_last_usable = backup_entries_lba - 1
    struct.pack_into("<Q", header, 32, new_alt)
    struct.pack_into("<Q", header, 48, new_last_usable)
    seal_header(header, hsize)
    backup = bytearray(header)
    struct.pack_into("<QQ", backup, 24, new_alt, my_lba)
    struct.pack_into("<Q", backup, 72, backup_entries_lba)
    seal_header(backup, hsize)
    padded_entries = entries[:table_bytes] + bytes(table_sectors * sector - table_bytes)
    writes = [
        (backup_entries_lba * sector, padded_entries),
        (new_alt * sector, bytes(backup)),
        (sector, bytes(header)),
    ]
    if alt_lba < disk_sectors and alt_lba != my_lba:
        writes.insert(0, (alt_lba * sector, bytes(sector)))  # the stale backup header
    new_mbr = _grow_protective_mbr(mbr, disk_sectors)
    if new_mbr is not None:
        writes.append((0, new_mbr))
    return Relocation(writes)


def _grow_protective_mbr(mbr: bytes, disk_sectors: int) -> bytes | None:
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return None
    out = bytearray(mbr)
    types = [out[446 + 16 * i + 4] for i in range(4)]
    if sum(1 for t in types if t != 0) != 1:
        return None  # a hybrid MBR (other entries beside 0xEE): grown, 0xEE would overlap them
    changed = False
    for i in range(4):
        entry = 446 + 16 * i
        if out[entry + 4] == 0xEE:
            (start,) = struct.unpack_from("<I", out, entry + 8)
            struct.pack_into("<I", out, entry + 12, min(disk_sectors - start, 0xFFFFFFFF))
            changed = True
    return bytes(out) if changed else None


def fix_backup_gpt(fd: int, sector: int, disk_size: int) -> bool:
    """Relocate the backup GPT on an open device; True if anything was written."""
    head = os.pread(fd, 2 * sector, 0)
    if len(head) < 2 * sector or not is_gpt(head, sector):
        return False
    offset, table = gpt_entries_extent(head, sector)
    if table > 16 << 20 or offset + table > disk_size:
        return False
    entries = os.pread(fd, table, offset)
    plan = relocate(head[:sector], head[sector:], entries, sector, disk_size // sector)
    if plan is None:
        return False
    for offset, data in plan.writes:
        os.pwrite(fd, data, offset)
    os.fsync(fd)
    return True
