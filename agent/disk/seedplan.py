"""Adding a small seed partition at the very end of a disk: pure table editing, GPT or MBR.

The seed goes after all free space, never right after the last partition, because
growpart grows a partition only up to the next one: the deployed system must still
be able to grow its root over the rest of the disk on first boot. Planning takes
the table's bytes and returns the byte writes that make the new table; nothing here
touches a device. A GPT whose backup is not yet at the disk's end is relocated in
the same plan (agent.disk.gpt.relocate), so a refusal writes nothing at all.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from enum import StrEnum

from agent.disk.errors import NoSpace, TableError
from agent.disk.gpt import is_gpt, relocate, seal_header
from agent.disk.mbr import MBR_EXTENDED, chs, mbr_partitions

MiB = 1 << 20
ALIGN = MiB
NAME = "cidata"
GPT_TYPE = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")  # Microsoft basic data
MBR_TYPE = 0x0C  # FAT32 (LBA): what config drives use; Linux and cloud-init look at the label


class TableType(StrEnum):
    GPT = "gpt"
    MBR = "dos"


@dataclass(frozen=True)
class Geometry:
    size: int  # bytes
    sector: int  # logical sector size

    @property
    def sectors(self) -> int:
        return self.size // self.sector


@dataclass(frozen=True)
class Placement:
    """Where the seed goes, and the writes (byte offset, data), in order, that make the new table."""

    table: TableType
    number: int  # 1-based partition number
    start: int  # bytes
    size: int  # bytes
    replaced: bool  # an earlier seed partition was reused
    writes: tuple[tuple[int, bytes], ...]


def plan_seed(
    head: bytes,
    entries: bytes,
    geometry: Geometry,
    seed_size: int,
    *,
    disk: str = "disk",
    guid_seed: bytes | None = None,
    mbr_seeds: frozenset[int] = frozenset(),
) -> Placement:
    """Plan a seed partition of at least seed_size bytes ending at the end of the disk's usable area.

    head: the disk's first two logical sectors; entries: the GPT entry array (b"" for MBR);
    guid_seed makes the new GUID deterministic (tests); mbr_seeds: MBR partition numbers that
    hold an earlier seed (MBR has no names: the caller tells them by their CIDATA label).
    """
    sector = geometry.sector
    if len(head) < 2 * sector:
        raise TableError(f"{disk}: expected the first {2 * sector} bytes, got {len(head)}")
    if is_gpt(head, sector):
        return _plan_gpt(head, entries, geometry, seed_size, disk, guid_seed)
    if head[510:512] != b"\x55\xaa":
        raise TableError(
            f"{disk}: no partition table: expected a GPT header at byte {sector} "
            f"or the MBR signature 55aa at byte 510, found {head[510:512].hex()}"
        )
    if any(e.kind == 0xEE for e in mbr_partitions(head)):
        raise TableError(f"{disk}: protective MBR but no GPT header at byte {sector}")
    return _plan_mbr(head, geometry, seed_size, disk, mbr_seeds)


def _seed_start(last: int, seed_size: int, sector: int) -> int:
    """The highest 1 MiB-aligned LBA that leaves at least seed_size bytes up to and including `last`."""
    align = max(1, ALIGN // sector)
    return (last + 1 - -(-seed_size // sector)) // align * align


def _no_space(disk: str, free_from: int, last: int, seed_size: int, sector: int, after: str) -> NoSpace:
    free = max(0, last + 1 - free_from) * sector
    return NoSpace(
        f"{disk}: the seed needs {seed_size} bytes at the end of the disk, 1 MiB aligned; "
        f"{free} bytes are free there (LBA {free_from}-{last}, {after})"
    )


# GPT ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    raw: bytes
    hsize: int
    my_lba: int
    alt_lba: int
    first_usable: int
    last_usable: int
    entries_lba: int
    count: int
    entry_size: int


def _parse_header(raw: bytes, sector: int, disk: str) -> _Header:
    (hsize,) = struct.unpack_from("<I", raw, 12)
    if not 92 <= hsize <= sector:
        raise TableError(f"{disk}: GPT header size {hsize}, expected 92..{sector}")
    check = bytearray(raw[:sector])
    seal_header(check, hsize)
    if check[16:20] != raw[16:20]:
        raise TableError(
            f"{disk}: GPT header CRC {raw[16:20][::-1].hex()}, calculated {check[16:20][::-1].hex()}"
        )
    my_lba, alt_lba, first, last = struct.unpack_from("<QQQQ", raw, 24)
    entries_lba, count, entry_size = struct.unpack_from("<QII", raw, 72)
    if entry_size < 128 or entry_size % 8:
        raise TableError(f"{disk}: GPT entry size {entry_size}, expected a multiple of 8, at least 128")
    return _Header(bytes(raw[:sector]), hsize, my_lba, alt_lba, first, last, entries_lba, count, entry_size)


def _fresh_guid(guid_seed: bytes | None, taken: set[bytes]) -> bytes:
    for n in range(1000):
        raw = os.urandom(16) if guid_seed is None else hashlib.sha256(guid_seed + bytes([n % 256])).digest()
        guid = uuid.UUID(bytes=raw[:16], version=4).bytes_le
        if guid not in taken:
            return guid
    raise AssertionError("no unique GUID in 1000 tries")


def _gpt_name(entry: bytes) -> str:
    return entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]


def _plan_gpt(
    head: bytes, entries: bytes, geo: Geometry, seed_size: int, disk: str, guid_seed: bytes | None
) -> Placement:
    sector = geo.sector
    hdr = _parse_header(head[sector : 2 * sector], sector, disk)
    table_bytes = hdr.count * hdr.entry_size
    if len(entries) < table_bytes:
        raise TableError(f"{disk}: GPT entry array is {table_bytes} bytes, got {len(entries)}")
    (crc,) = struct.unpack_from("<I", hdr.raw, 88)
    actual = zlib.crc32(entries[:table_bytes]) & 0xFFFFFFFF
    if actual != crc:
        raise TableError(f"{disk}: GPT entry array CRC {actual:08x}, header says {crc:08x}")
    writes: list[tuple[int, bytes]] = []
    mbr_write: list[tuple[int, bytes]] = []
    if hdr.alt_lba != geo.sectors - 1:
        moved = relocate(head[:sector], hdr.raw, entries, sector, geo.sectors)
        if moved is None:
            raise TableError(f"{disk}: cannot move the backup GPT from LBA {hdr.alt_lba} to the disk's end")
        new_header = next(data for off, data in moved.writes if off == sector)
        writes += [(off, data) for off, data in moved.writes if off == hdr.alt_lba * sector]
        mbr_write = [(off, data) for off, data in moved.writes if off == 0]
        hdr = _parse_header(new_header, sector, disk)
    table_sectors = -(-table_bytes // sector)
    backup_entries_lba = hdr.alt_lba - table_sectors
    if hdr.last_usable >= backup_entries_lba or hdr.entries_lba + table_sectors > hdr.first_usable:
        raise TableError(
            f"{disk}: GPT usable area LBA {hdr.first_usable}-{hdr.last_usable} overlaps its tables"
        )

    table = bytearray(entries[:table_bytes])
    slots = [bytes(table[i * hdr.entry_size : (i + 1) * hdr.entry_size]) for i in range(hdr.count)]
    used = [i for i, e in enumerate(slots) if e[:16] != bytes(16)]
    seeds = [i for i in used if _gpt_name(slots[i]).lower() == NAME]
    others = [i for i in used if i not in seeds]
    free = [i for i in range(hdr.count) if i not in used]
    if not seeds and not free:
        raise TableError(f"{disk}: all {hdr.count} GPT entries are used, none free for the seed")
    slot = seeds[0] if seeds else free[0]
    ends = {i: int(struct.unpack_from("<Q", slots[i], 40)[0]) for i in others}
    last_used = max(ends.values(), default=hdr.first_usable - 1)
    start = _seed_start(hdr.last_usable, seed_size, sector)
    if start <= last_used or start < hdr.first_usable:
        after = f"after partition {max(ends, key=lambda i: ends[i]) + 1}" if ends else "an empty table"
        raise _no_space(disk, max(last_used + 1, hdr.first_usable), hdr.last_usable, seed_size, sector, after)

    if seeds:
        guid = slots[slot][16:32]
    else:
        guid = _fresh_guid(guid_seed, {e[16:32] for e in slots} | {hdr.raw[56:72]})
    new = bytearray(hdr.entry_size)
    new[0:16] = GPT_TYPE.bytes_le
    new[16:32] = guid
    struct.pack_into("<QQQ", new, 32, start, hdr.last_usable, 0)
    new[56:128] = NAME.encode("utf-16-le").ljust(72, b"\0")
    for i in seeds:
        table[i * hdr.entry_size : (i + 1) * hdr.entry_size] = bytes(hdr.entry_size)
    table[slot * hdr.entry_size : (slot + 1) * hdr.entry_size] = new

    primary = bytearray(hdr.raw)
    struct.pack_into("<I", primary, 88, zlib.crc32(table) & 0xFFFFFFFF)
    backup = bytearray(primary)
    struct.pack_into("<QQ", backup, 24, hdr.alt_lba, hdr.my_lba)
    struct.pack_into("<Q", backup, 72, backup_entries_lba)
    seal_header(primary, hdr.hsize)
    seal_header(backup, hdr.hsize)
    padded = bytes(table) + bytes(table_sectors * sector - table_bytes)
    writes += [
        (backup_entries_lba * sector, padded),
        (hdr.alt_lba * sector, bytes(backup)),
        (hdr.entries_lba * sector, padded),
        (sector, bytes(primary)),
        *mbr_write,
    ]
    size = (hdr.last_usable + 1 - start) * sector
    return Placement(TableType.GPT, slot + 1, start * sector, size, bool(seeds), tuple(writes))


# MBR ------------------------------------------------------------------------------------------


def _plan_mbr(head: bytes, geo: Geometry, seed_size: int, disk: str, mbr_seeds: frozenset[int]) -> Placement:
    sector = geo.sector
    if geo.sectors > 1 << 32:
        raise TableError(
            f"{disk}: {geo.sectors} sectors, an MBR addresses at most {1 << 32}: the disk's end, "
            "where the seed must go, is out of its reach"
        )
    parts = mbr_partitions(head)
    seeds = [p for p in parts if p.number in mbr_seeds]
    others = [p for p in parts if p.number not in mbr_seeds]
    free = [n for n in range(1, 5) if n not in {p.number for p in parts}]
    if not seeds and not free:
        kinds = ", ".join(f"{p.number}: type {p.kind:#04x}" for p in parts)
        raise TableError(
            f"{disk}: all 4 primary MBR entries are used ({kinds}); the seed would need "
            "an extended partition, which sledge does not create"
        )
    number = seeds[0].number if seeds else free[0]
    last = geo.sectors - 1
    start = _seed_start(last, seed_size, sector)
    last_used = max((p.last for p in others), default=0)
    if start <= last_used or start < 1:
        top = max(others, key=lambda p: p.last)
        if top.kind in MBR_EXTENDED and top.last >= start:
            raise TableError(
                f"{disk}: the free space at the end of the disk is inside extended partition "
                f"{top.number}: the seed would need a logical partition, which sledge does not create"
            )
        raise _no_space(disk, last_used + 1, last, seed_size, sector, f"after partition {top.number}")
    out = bytearray(head[:sector])
    for p in seeds:
        out[446 + 16 * (p.number - 1) : 446 + 16 * p.number] = bytes(16)
    entry = (
        bytes([0]) + chs(start) + bytes([MBR_TYPE]) + chs(last) + struct.pack("<II", start, last + 1 - start)
    )
    out[446 + 16 * (number - 1) : 446 + 16 * number] = entry
    size = (last + 1 - start) * sector
    return Placement(TableType.MBR, number, start * sector, size, bool(seeds), ((0, bytes(out)),))
