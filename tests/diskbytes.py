"""Disks as bytes for the table tests: a sparse in-memory disk, and GPTs and MBRs crafted on it
the way sgdisk and sfdisk write them (then bent by each test as a hostile tenant would)."""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from agent.disk.gpt import seal_header
from agent.disk.seedplan import Geometry, Placement

MiB = 1 << 20
LINUX = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le


class Disk:
    """A sparse disk: the bytes written, zeros elsewhere."""

    def __init__(self, size: int, sector: int) -> None:
        self.size, self.sector = size, sector
        self.blocks: dict[int, bytes] = {}

    def write(self, offset: int, data: bytes) -> None:
        assert offset + len(data) <= self.size, f"write past the end at {offset}"
        assert offset % self.sector == 0 and len(data) % self.sector == 0, "whole sectors only"
        for i in range(0, len(data), self.sector):
            self.blocks[(offset + i) // self.sector] = data[i : i + self.sector]

    def read(self, offset: int, length: int) -> bytes:
        first, last = offset // self.sector, (offset + length - 1) // self.sector
        raw = b"".join(self.blocks.get(n, bytes(self.sector)) for n in range(first, last + 1))
        return raw[offset - first * self.sector :][:length]

    def apply(self, plan: Placement) -> None:
        for offset, data in plan.writes:
            self.write(offset, data)

    def head(self) -> bytes:
        return self.read(0, 2 * self.sector)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.sector)


@dataclass(frozen=True)
class Part:
    first: int
    last: int
    name: str = "root"
    kind: bytes = LINUX


def gpt_disk(
    size: int,
    sector: int,
    parts: list[Part],
    image_size: int | None = None,
    *,
    entries_lba: int = 2,
    count: int = 128,
    slots: list[int] | None = None,
) -> Disk:
    """A GPT as sgdisk writes it for an image of image_size bytes, on a disk of size bytes;
    `entries_lba` and `count` as `sgdisk -j` and `-S` set them; `slots`: where each part goes."""
    disk = Disk(size, sector)
    image_sectors = (image_size or size) // sector
    table_bytes = count * 128
    table_sectors = -(-table_bytes // sector)
    entries = bytearray(table_sectors * sector)
    for i, p in enumerate(parts):
        n = slots[i] if slots else i
        e = entries[n * 128 : (n + 1) * 128]
        e[0:16], e[16:32] = p.kind, uuid.UUID(int=i + 1).bytes_le
        struct.pack_into("<QQ", e, 32, p.first, p.last)
        e[56:128] = p.name.encode("utf-16-le").ljust(72, b"\0")
        entries[n * 128 : (n + 1) * 128] = e
    alt = image_sectors - 1
    first_usable = max(34 if sector == 512 else 6, entries_lba + table_sectors)
    hdr = bytearray(sector)
    hdr[0:12] = b"EFI PART\x00\x00\x01\x00"
    struct.pack_into("<IIIQQQQ", hdr, 12, 92, 0, 0, 1, alt, first_usable, alt - table_sectors - 1)
    hdr[56:72] = uuid.UUID(int=99).bytes_le
    struct.pack_into("<QIII", hdr, 72, entries_lba, count, 128, zlib.crc32(entries[:table_bytes]))
    backup = bytearray(hdr)
    struct.pack_into("<QQ", backup, 24, alt, 1)
    struct.pack_into("<Q", backup, 72, alt - table_sectors)
    seal_header(hdr, 92)
    seal_header(backup, 92)
    mbr = bytearray(sector)
    mbr[446:462] = bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF]) + struct.pack("<II", 1, image_sectors - 1)
    mbr[510:512] = b"\x55\xaa"
    for offset, data in [(0, mbr), (sector, hdr), (entries_lba * sector, entries)]:
        disk.write(offset, bytes(data))
    disk.write((alt - table_sectors) * sector, bytes(entries))
    disk.write(alt * sector, bytes(backup))
    return disk


def reseal(disk: Disk, lba: int, **fields: int) -> None:
    """Set header fields at `lba` (by offset name) and fix its CRC, as a careful forger would."""
    offsets = {"revision": 8, "size": 12, "reserved": 20, "my_lba": 24, "alt_lba": 32, "first_usable": 40}
    offsets |= {"last_usable": 48, "entries_lba": 72, "count": 80, "entry_size": 84, "entries_crc": 88}
    hdr = bytearray(disk.read(lba * disk.sector, disk.sector))
    for name, value in fields.items():
        fmt = "<Q" if name in ("my_lba", "alt_lba", "first_usable", "last_usable", "entries_lba") else "<I"
        struct.pack_into(fmt, hdr, offsets[name], value)
    (size,) = struct.unpack_from("<I", hdr, 12)
    seal_header(hdr, min(max(size, 92), disk.sector))
    disk.write(lba * disk.sector, bytes(hdr))


def reseal_entries(disk: Disk, lba: int) -> None:
    """Recompute the entry-array CRC in the header at `lba`, then its own CRC."""
    hdr = disk.read(lba * disk.sector, disk.sector)
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    if count * size > 16 * MiB or (entries_lba * disk.sector) + count * size > disk.size:
        return  # no array to cover: a forger has nothing to fix
    reseal(disk, lba, entries_crc=zlib.crc32(disk.read(entries_lba * disk.sector, count * size)))


def read_gpt(disk: Disk, lba: int) -> tuple[bytes, list[bytes]]:
    """A header (checked) and its entry array (checked), at `lba`."""
    s = disk.sector
    hdr = disk.read(lba * s, s)
    assert hdr[:8] == b"EFI PART"
    check = bytearray(hdr)
    seal_header(check, 92)
    assert check == hdr, f"header CRC at LBA {lba}"
    entries_lba, count, esize, crc = struct.unpack_from("<QIII", hdr, 72)
    raw = disk.read(entries_lba * s, count * esize)
    assert zlib.crc32(raw) == crc, f"entry array CRC for the header at LBA {lba}"
    return hdr, [raw[i * esize : (i + 1) * esize] for i in range(count)]


def mbr_disk(size: int, parts: list[tuple[int, int, int]], sector: int = 512) -> Disk:
    """(type, start LBA, sectors) per primary entry, in order."""
    disk = Disk(size, sector)
    mbr = bytearray(sector)
    for i, (kind, start, count) in enumerate(parts):
        mbr[446 + 16 * i + 4] = kind
        struct.pack_into("<II", mbr, 446 + 16 * i + 8, start, count)
    mbr[510:512] = b"\x55\xaa"
    disk.write(0, bytes(mbr))
    return disk
