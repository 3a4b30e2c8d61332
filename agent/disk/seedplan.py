"""Adding a small seed partition at the very end of a disk: pure table editing, GPT or MBR.

The seed goes after all free space, never right after the last partition, because
growpart grows a partition only up to the next one: the deployed system must still
be able to grow its root over the rest of the disk on first boot. Planning takes
the careful reader's view of the disk (agent.disk.tables) and returns the byte writes
that make the new table; nothing here touches a device. Only a primary GPT with no
problem at all is edited; a backup not yet the primary's mirror at the disk's end is
rewritten in the same plan (agent.disk.gpt.relocate), so a refusal writes nothing.
An earlier seed is replaced only when the caller proved it is a FAT sledge made
(agent.disk.vfat.is_seed_fat); any other partition, whatever its name, is kept.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from agent.disk.errors import NoSpace, TableError
from agent.disk.gpt import backup_of, relocate, seal_header
from agent.disk.mbr import MBR_EXTENDED, MBR_FAT, MbrEntry, chs, mbr_partitions
from agent.disk.tables import GptEntry, Tables, parse_header

MiB = 1 << 20
ALIGN = MiB
NAME = "cidata"
GPT_TYPE = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")  # Microsoft basic data
MAX_CANDIDATES = 8
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


@dataclass(frozen=True)
class Candidate:
    """A partition that may hold an earlier seed; the caller checks its first sector."""

    number: int  # 1-based
    start: int  # LBA
    sectors: int


def seed_candidates(tables: Tables) -> list[Candidate]:
    """GPT entries named cidata, or FAT-typed MBR primaries: where an earlier seed could be. At most
    MAX_CANDIDATES (the caller reads a sector of each; a table may name 131,072 of them): any
    further one is kept as an ordinary partition, never replaced."""
    if tables.primary is not None:
        if not tables.primary.valid:
            return []
        named = (e for e in tables.primary.used if e.name.lower() == NAME)
        return [
            Candidate(e.slot + 1, e.first, e.last + 1 - e.first)
            for e in itertools.islice(named, MAX_CANDIDATES)
        ]
    if tables.mbr is None:
        return []
    return [Candidate(e.number, e.start, e.sectors) for e in tables.mbr.primaries if e.kind in MBR_FAT]


def plan_seed(
    tables: Tables,
    seed_size: int,
    *,
    disk: str = "disk",
    guid_seed: bytes | None = None,
    guid: bytes | None = None,
    proven: frozenset[int] = frozenset(),
) -> Placement:
    """Plan a seed partition of at least seed_size bytes ending at the end of the disk's usable area.

    proven: partition numbers (from seed_candidates) whose first sector the caller found to be a
    FAT sledge made, labelled CIDATA: only those are replaced. guid_seed makes a new GUID
    deterministic (tests); guid gives it outright (verify replays a seed with the disk's GUID).
    """
    geometry = Geometry(tables.sectors * tables.sector, tables.sector)
    if tables.primary is not None:
        return _plan_gpt(tables, geometry, seed_size, disk, guid_seed, guid, proven)
    if tables.mbr is None:
        raise TableError(
            f"{disk}: no partition table: expected a GPT header at byte {tables.sector} "
            "or the MBR signature 55aa at byte 510"
        )
    if tables.mbr.protective:
        raise TableError(f"{disk}: protective MBR but no GPT header at byte {tables.sector}")
    return _plan_mbr(tables.mbr.raw, tables.mbr.logical, geometry, seed_size, disk, proven)


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


def _fresh_guid(guid_seed: bytes | None, taken: set[bytes]) -> bytes:
    for n in range(1000):
        raw = os.urandom(16) if guid_seed is None else hashlib.sha256(guid_seed + bytes([n % 256])).digest()
        guid = uuid.UUID(bytes=raw[:16], version=4).bytes_le
        if guid not in taken:
            return guid
    raise AssertionError("no unique GUID in 1000 tries")


def _plan_gpt(
    tables: Tables,
    geo: Geometry,
    seed_size: int,
    disk: str,
    guid_seed: bytes | None,
    guid: bytes | None,
    proven: frozenset[int],
) -> Placement:
    sector = geo.sector
    copy = tables.primary
    assert copy is not None
    if not copy.valid or copy.entries is None:
        raise TableError(f"{disk}: the primary GPT is not trusted: {'; '.join(copy.problems)}")
    writes: list[tuple[int, bytes]] = []
    mbr_write: list[tuple[int, bytes]] = []
    raw = copy.header.raw
    moved = relocate(tables)
    if moved is not None:
        raw = next((data for off, data in moved.writes if off == sector), raw)
        if moved.cleared is not None:
            writes.append((moved.cleared * sector, bytes(sector)))
        mbr_write = [(off, data) for off, data in moved.writes if off == 0]
    hdr = parse_header(raw, 1)
    assert hdr is not None  # relocate keeps the signature
    table_bytes = hdr.array_bytes
    table_sectors = hdr.array_sectors(sector)
    backup_entries_lba = hdr.alt_lba - table_sectors

    used: Sequence[GptEntry] = copy.used
    seeds = [e for e in used if e.slot + 1 in proven and e.name.lower() == NAME]
    seed_slots = {e.slot for e in seeds}
    others = [e for e in used if e.slot not in seed_slots]
    taken = {e.slot for e in used}
    slot = seeds[0].slot if seeds else next((i for i in range(hdr.count) if i not in taken), None)
    if slot is None:
        raise TableError(f"{disk}: all {hdr.count} GPT entries are used, none free for the seed")
    top = max(others, key=lambda e: e.last, default=None)
    last_used = top.last if top is not None else hdr.first_usable - 1
    start = _seed_start(hdr.last_usable, seed_size, sector)
    if start <= last_used or start < hdr.first_usable:
        after = f"after partition {top.slot + 1}" if top is not None else "an empty table"
        raise _no_space(disk, max(last_used + 1, hdr.first_usable), hdr.last_usable, seed_size, sector, after)

    if guid is None:
        guid = seeds[0].guid if seeds else _fresh_guid(guid_seed, {e.guid for e in used} | {hdr.disk_guid})
    new = bytearray(hdr.entry_size)
    new[0:16] = GPT_TYPE.bytes_le
    new[16:32] = guid
    struct.pack_into("<QQQ", new, 32, start, hdr.last_usable, 0)
    new[56:128] = NAME.encode("utf-16-le").ljust(72, b"\0")
    assert copy.entries is not None
    table = bytearray(copy.entries[:table_bytes])
    for i in seed_slots:
        table[i * hdr.entry_size : (i + 1) * hdr.entry_size] = bytes(hdr.entry_size)
    table[slot * hdr.entry_size : (slot + 1) * hdr.entry_size] = new

    primary = bytearray(hdr.raw)
    struct.pack_into("<I", primary, 88, zlib.crc32(table) & 0xFFFFFFFF)
    seal_header(primary, hdr.size)
    backup = backup_of(bytes(primary), hdr.alt_lba, backup_entries_lba)
    padded = bytes(table) + bytes(table_sectors * sector - table_bytes)
    writes += [
        (backup_entries_lba * sector, padded),
        (hdr.alt_lba * sector, backup),
        (hdr.entries_lba * sector, padded),
        (sector, bytes(primary)),
        *mbr_write,
    ]
    size = (hdr.last_usable + 1 - start) * sector
    return Placement(TableType.GPT, slot + 1, start * sector, size, bool(seeds), tuple(writes))


# MBR ------------------------------------------------------------------------------------------


def _plan_mbr(
    head: bytes,
    logical: Sequence[MbrEntry],
    geo: Geometry,
    seed_size: int,
    disk: str,
    proven: frozenset[int],
) -> Placement:
    sector = geo.sector
    if geo.sectors > 1 << 32:
        raise TableError(
            f"{disk}: {geo.sectors} sectors, an MBR addresses at most {1 << 32}: the disk's end, "
            "where the seed must go, is out of its reach"
        )
    parts = mbr_partitions(head)
    seeds = [p for p in parts if p.number in proven and p.kind in MBR_FAT]
    others = [p for p in parts if p not in seeds] + list(logical)
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
    top = max(others, key=lambda p: p.last, default=None)
    last_used = top.last if top is not None else 0
    if start <= last_used or start < 1:
        if top is not None and top.kind in MBR_EXTENDED and top.last >= start:
            raise TableError(
                f"{disk}: the free space at the end of the disk is inside extended partition "
                f"{top.number}: the seed would need a logical partition, which sledge does not create"
            )
        after = f"after partition {top.number}" if top is not None else "an empty table"
        raise _no_space(disk, last_used + 1, last, seed_size, sector, after)
    out = bytearray(head[:512])
    for p in seeds:
        out[446 + 16 * (p.number - 1) : 446 + 16 * p.number] = bytes(16)
    entry = (
        bytes([0]) + chs(start) + bytes([MBR_TYPE]) + chs(last) + struct.pack("<II", start, last + 1 - start)
    )
    out[446 + 16 * (number - 1) : 446 + 16 * number] = entry
    size = (last + 1 - start) * sector
    return Placement(TableType.MBR, number, start * sector, size, bool(seeds), ((0, bytes(out)),))
