"""The MBR: its four primary entries, and CHS addresses for entries sledge writes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
MBR_FAT = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})


@dataclass(frozen=True)
class MbrEntry:
    number: int
    kind: int
    start: int  # LBA
    sectors: int

    @property
    def last(self) -> int:
        return self.start + self.sectors - 1


def mbr_partitions(head: bytes) -> list[MbrEntry]:
    """The used primary entries of an MBR (type not 0 and a non-zero size)."""
    out = []
    for i in range(4):
        kind = head[446 + 16 * i + 4]
        start, sectors = struct.unpack_from("<II", head, 446 + 16 * i + 8)
        if kind and sectors:
            out.append(MbrEntry(i + 1, kind, start, sectors))
    return out


def chs(lba: int) -> bytes:
    cyl, rest = divmod(lba, 255 * 63)
    if cyl > 1023:
        return b"\xfe\xff\xff"  # beyond CHS: the conventional 1023/254/63
    head, sec = divmod(rest, 63)
    return bytes([head, (sec + 1) | ((cyl >> 2) & 0xC0), cyl & 0xFF])
