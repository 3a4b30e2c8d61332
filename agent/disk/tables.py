"""A careful reader of the partition tables on a disk a stranger prepared.

On shared bare metal the previous user wrote every byte of a disk, so its tables are
hostile input, like a manifest from an unknown server. read_tables reads the MBR (and
the EBR chain of an extended partition) and both GPT copies, checks every GPT header
field and both CRCs, and says what it found and, for everything it did not trust, why.
Work and memory are bounded whatever the fields say: an entry array is read only when
it is at most MAX_ARRAY bytes and inside the disk, the EBR chain stops after
MAX_LOGICAL links or at its first loop, and each step is linear in the entries read.

Callers choose their level of trust: erase wants every partition any copy names
(`partitions(trusted_only=False)`), the seed and the backup move want a primary GPT
with no problem at all (`GptCopy.problems` empty).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from agent.disk.mbr import MBR_EXTENDED, MbrEntry, mbr_partitions

Read = Callable[[int, int], bytes]  # (byte offset, length) -> bytes; shorter at the disk's end

SIGNATURE = b"EFI PART"
REVISION = 0x00010000
MAX_ARRAY = 16 << 20  # 131,072 entries of 128 bytes; sgdisk's default array is 16 KiB
MAX_LOGICAL = 256  # logical partitions followed in an EBR chain (Linux stops at 256 too)
PROTECTIVE = 0xEE
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 bytes UEFI defines


@dataclass(frozen=True)
class GptHeader:
    lba: int  # where it was read
    raw: bytes  # the whole sector
    revision: int
    size: int
    crc: int
    reserved: int
    my_lba: int
    alt_lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entries_lba: int
    count: int
    entry_size: int
    entries_crc: int

    @property
    def array_bytes(self) -> int:
        return self.count * self.entry_size

    def array_sectors(self, sector: int) -> int:
        return -(-self.array_bytes // sector)

    def crc_ok(self) -> bool:
        if not 92 <= self.size <= len(self.raw):
            return False
        return header_crc(self.raw, self.size) == self.crc


class GptEntry(NamedTuple):  # a tuple, not a frozen dataclass: an array may hold 131,072 of them
    slot: int  # 0-based index in the array
    type_guid: bytes
    guid: bytes
    first: int
    last: int
    attributes: int
    name: str


@dataclass(frozen=True)
class GptCopy:
    header: GptHeader
    entries: bytes | None  # the array as read; None when it was not read (out of bounds)
    used: tuple[GptEntry, ...]
    problems: tuple[str, ...]  # empty: every field and both CRCs check out

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class MbrTable:
    raw: bytes  # LBA 0 (512 bytes)
    primaries: tuple[MbrEntry, ...]
    logical: tuple[MbrEntry, ...]  # absolute start LBAs, numbered from 5 as Linux does
    ebrs: tuple[int, ...]  # LBAs of the EBRs read

    @property
    def protective(self) -> bool:
        return any(e.kind == PROTECTIVE for e in self.primaries)


@dataclass(frozen=True)
class Partition:
    table: str  # "mbr", "ebr", "gpt primary", "gpt backup"
    number: int  # 1-based
    first: int  # LBA
    last: int  # LBA, inclusive


@dataclass(frozen=True)
class Tables:
    sector: int
    sectors: int  # the disk's size in logical sectors
    mbr: MbrTable | None
    primary: GptCopy | None  # the header at LBA 1, if it has the signature
    backup: GptCopy | None  # the backup header chosen (valid if any candidate is)
    copies: tuple[GptCopy, ...]  # every header with the signature that was read
    notes: tuple[str, ...]  # what was distrusted, and why

    def real_header_at(self, lba: int) -> bool:
        """Whether a GPT header with a good CRC that names itself sits at `lba`."""
        return any(c.header.lba == lba and c.header.my_lba == lba and c.header.crc_ok() for c in self.copies)

    def partitions(self, trusted_only: bool = True) -> list[Partition]:
        """The partitions the tables list; with trusted_only False also those of distrusted copies
        and MBR entries reaching past the disk's end (erase wants every one a tool could use)."""
        out: list[Partition] = []
        if self.mbr is not None:
            for e in self.mbr.primaries:
                if e.kind != PROTECTIVE and (not trusted_only or e.last < self.sectors):
                    out.append(Partition("mbr", e.number, e.start, e.last))
            for e in self.mbr.logical:
                if not trusted_only or e.last < self.sectors:
                    out.append(Partition("ebr", e.number, e.start, e.last))
        for copy in self.copies:
            if trusted_only and not (copy.valid and (copy is self.primary or copy is self.backup)):
                continue
            name = "gpt primary" if copy is self.primary else "gpt backup"
            out += [Partition(name, e.slot + 1, e.first, e.last) for e in copy.used]
        return out

    def structures(self) -> list[tuple[int, int]]:
        """(byte offset, length) of every GPT header and entry array seen, clamped to the disk."""
        size = self.sectors * self.sector
        out = []
        for c in self.copies:
            h = c.header
            out.append((h.lba * self.sector, self.sector))
            start = h.entries_lba * self.sector
            if start < size and h.array_bytes:
                out.append((start, min(h.array_bytes, MAX_ARRAY, size - start)))
        return out


def header_crc(raw: bytes, size: int) -> int:
    data = bytearray(raw[:size])
    data[16:20] = bytes(4)
    return zlib.crc32(data) & 0xFFFFFFFF


def parse_header(raw: bytes, lba: int) -> GptHeader | None:
    """The header fields of a sector with the GPT signature (unchecked), or None without one."""
    if len(raw) < 92 or raw[:8] != SIGNATURE:
        return None
    f = _HEADER.unpack_from(raw)
    return GptHeader(lba, bytes(raw), *f[1:])


def parse_entries(entries: bytes, count: int, entry_size: int) -> tuple[GptEntry, ...]:
    """The used entries (type GUID not zero) of an array; linear in its size."""
    out = []
    empty = bytes(16)
    for slot in range(min(count, len(entries) // entry_size if entry_size else 0)):
        off = slot * entry_size
        if entries[off : off + 16] == empty:
            continue
        first, last, attrs = struct.unpack_from("<QQQ", entries, off + 32)
        name = entries[off + 56 : off + 128].decode("utf-16-le", "replace").split("\0", 1)[0]
        out.append(
            GptEntry(slot, entries[off : off + 16], entries[off + 16 : off + 32], first, last, attrs, name)
        )
    return tuple(out)


def _check_header(h: GptHeader, sector: int, sectors: int, primary: bool) -> list[str]:
    """Every field of a header against the disk it was read from; each problem names the field,
    what was expected and what was found."""
    where = f"GPT header at LBA {h.lba}"
    p: list[str] = []
    if h.revision != REVISION:
        p.append(f"{where}: revision {h.revision:#010x}, expected {REVISION:#010x}")
    if not 92 <= h.size <= sector:
        p.append(f"{where}: header size {h.size}, expected 92..{sector}")
    elif not h.crc_ok():
        p.append(f"{where}: header CRC {h.crc:08x}, calculated {header_crc(h.raw, h.size):08x}")
    if h.reserved:
        p.append(f"{where}: reserved field {h.reserved:#x}, expected 0")
    if h.my_lba != h.lba:
        p.append(f"{where}: MyLBA {h.my_lba}, expected {h.lba} (where it was read)")
    if h.entry_size < 128 or h.entry_size & (h.entry_size - 1):
        p.append(f"{where}: entry size {h.entry_size}, expected 128 times a power of two")
    if h.count == 0 or h.array_bytes > MAX_ARRAY:
        p.append(f"{where}: {h.count} entries of {h.entry_size} bytes, expected 1..{MAX_ARRAY} bytes in all")
        return p  # the layout checks below need a sane array size
    n = h.array_sectors(sector)
    if not 2 <= h.first_usable <= h.last_usable < sectors:
        p.append(
            f"{where}: usable LBAs {h.first_usable}-{h.last_usable}, "
            f"expected inside 2-{sectors - 1} and in order"
        )
    if primary:
        if not h.last_usable + n < h.alt_lba < sectors:
            p.append(
                f"{where}: AlternateLBA {h.alt_lba}, expected after the usable area and its backup array "
                f"(> {h.last_usable + n}) and inside the {sectors}-sector disk"
            )
        if not (h.entries_lba >= 2 and h.entries_lba + n <= h.first_usable):
            p.append(
                f"{where}: entry array at LBA {h.entries_lba} ({n} sectors), expected between "
                f"LBA 2 and the first usable LBA {h.first_usable}"
            )
    else:
        if h.alt_lba != 1:
            p.append(f"{where}: AlternateLBA {h.alt_lba}, expected 1 (the primary header)")
        if h.first_usable < 2 + n:
            p.append(
                f"{where}: first usable LBA {h.first_usable}, "
                f"expected at least {2 + n} (after the primary array)"
            )
        if not (h.entries_lba > h.last_usable and h.entries_lba + n <= h.lba):
            p.append(
                f"{where}: entry array at LBA {h.entries_lba} ({n} sectors), expected between "
                f"the last usable LBA {h.last_usable} and the header"
            )
    return p


def _check_entries(h: GptHeader, entries: bytes, used: tuple[GptEntry, ...]) -> list[str]:
    where = f"GPT entry array of the header at LBA {h.lba}"
    actual = zlib.crc32(entries[: h.array_bytes]) & 0xFFFFFFFF
    if actual != h.entries_crc:
        return [f"{where}: CRC {actual:08x}, header says {h.entries_crc:08x}"]
    p = []
    for e in used:
        if not h.first_usable <= e.first <= e.last <= h.last_usable:
            p.append(
                f"{where}: partition {e.slot + 1} LBA {e.first}-{e.last}, expected inside the "
                f"usable LBAs {h.first_usable}-{h.last_usable}"
            )
            break  # one is enough to distrust the copy; more would only grow the note
    ordered = sorted(used, key=lambda e: e.first)
    for a, b in itertools.pairwise(ordered):
        if b.first <= a.last:
            p.append(f"{where}: partitions {a.slot + 1} and {b.slot + 1} overlap")
            break
    return p


def read_copy(read: Read, lba: int, sector: int, sectors: int, primary: bool) -> GptCopy | None:
    """The GPT copy whose header is at `lba`, checked; None if the sector has no signature."""
    raw = read(lba * sector, sector)
    h = parse_header(raw, lba) if len(raw) == sector else None
    if h is None:
        return None
    problems = _check_header(h, sector, sectors, primary)
    entries: bytes | None = None
    used: tuple[GptEntry, ...] = ()
    start = h.entries_lba * sector
    if 0 < h.array_bytes <= MAX_ARRAY and h.entry_size >= 128 and start + h.array_bytes <= sectors * sector:
        entries = read(start, h.array_bytes)
        if len(entries) == h.array_bytes:
            used = parse_entries(entries, h.count, h.entry_size)
            problems += _check_entries(h, entries, used)
        else:
            entries = None
    if entries is None:
        problems.append(
            f"GPT header at LBA {lba}: entry array of {h.count} x {h.entry_size} bytes at LBA "
            f"{h.entries_lba} not read: expected at most {MAX_ARRAY} bytes inside the {sectors}-sector disk"
        )
    return GptCopy(h, entries, used, tuple(problems))


def _agree(primary: GptCopy, backup: GptCopy) -> list[str]:
    a, b = primary.header, backup.header
    out = []
    for field in ("first_usable", "last_usable", "disk_guid", "count", "entry_size", "entries_crc"):
        x, y = getattr(a, field), getattr(b, field)
        if x != y:
            x, y = (x.hex(), y.hex()) if isinstance(x, bytes) else (x, y)
            out.append(f"GPT backup at LBA {b.lba} disagrees with the primary: {field} {y}, primary {x}")
    if a.alt_lba != b.lba:
        out.append(f"GPT primary names its backup at LBA {a.alt_lba}, the backup found is at LBA {b.lba}")
    return out


def read_mbr(read: Read, sector: int, sectors: int) -> tuple[MbrTable | None, list[str]]:
    """LBA 0's entries and the logical partitions of its extended partitions (EBR chains)."""
    raw = read(0, 512)
    if len(raw) < 512 or raw[510:512] != b"\x55\xaa":
        return None, []
    notes: list[str] = []
    primaries = tuple(mbr_partitions(raw))
    for e in primaries:
        if e.kind != PROTECTIVE and e.last >= sectors:
            notes.append(
                f"MBR partition {e.number} LBA {e.start}-{e.last} "
                f"reaches past the disk's last LBA {sectors - 1}"
            )
    logical: list[MbrEntry] = []
    ebrs: list[int] = []
    for ext in (e for e in primaries if e.kind in MBR_EXTENDED):
        ebr, seen = ext.start, set()
        while True:
            if len(ebrs) >= MAX_LOGICAL:
                notes.append(f"EBR chain of partition {ext.number}: stopped after {MAX_LOGICAL} links")
                break
            if ebr in seen:
                notes.append(f"EBR chain of partition {ext.number}: loops back to LBA {ebr}")
                break
            if not ext.start <= ebr <= min(ext.last, sectors - 1):
                notes.append(
                    f"EBR chain of partition {ext.number}: "
                    f"next EBR at LBA {ebr}, outside the extended partition"
                )
                break
            seen.add(ebr)
            data = read(ebr * sector, 512)
            if len(data) < 512 or data[510:512] != b"\x55\xaa":
                if ebr != ext.start:
                    notes.append(f"EBR at LBA {ebr}: no 55aa signature")
                break
            ebrs.append(ebr)
            for e in mbr_partitions(data)[:2]:
                if e.number == 1 and e.kind not in MBR_EXTENDED:
                    logical.append(MbrEntry(5 + len(logical), e.kind, ebr + e.start, e.sectors))
            nxt = [e for e in mbr_partitions(data) if e.number == 2 and e.kind in MBR_EXTENDED]
            if not nxt:
                break
            ebr = ext.start + nxt[0].start
    for e in logical:
        if e.last >= sectors:
            notes.append(f"logical partition {e.number} LBA {e.start}-{e.last} reaches past the disk's end")
    return MbrTable(bytes(raw), primaries, tuple(logical), tuple(ebrs)), notes


def read_tables(read: Read, size: int, sector: int) -> Tables:
    """Everything the disk's tables say, checked. `size`: the disk's size in bytes."""
    sectors = size // sector
    mbr, notes = read_mbr(read, sector, sectors) if sectors else (None, [])
    copies: list[GptCopy] = []
    primary = read_copy(read, 1, sector, sectors, True) if sectors > 2 else None
    if primary is not None:
        copies.append(primary)
        notes += primary.problems
    candidates = [sectors - 1]
    if primary is not None and 2 < primary.header.alt_lba < sectors - 1:
        candidates.insert(0, primary.header.alt_lba)
    backup: GptCopy | None = None
    for lba in candidates if sectors > 2 else []:
        copy = read_copy(read, lba, sector, sectors, False)
        if copy is None:
            continue
        copies.append(copy)
        notes += copy.problems
        if backup is None or (copy.valid and not backup.valid):
            backup = copy
    if primary is not None and primary.valid and backup is not None and backup.valid:
        notes += _agree(primary, backup)
    elif primary is not None and backup is None:
        notes.append(f"no backup GPT header at LBA {', '.join(map(str, candidates))}")
    return Tables(sector, sectors, mbr, primary, backup, tuple(copies), tuple(notes))
