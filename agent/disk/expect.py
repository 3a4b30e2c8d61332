"""What sledge itself may have changed in an image's tables: verify compares the disk against it.

After writing an image, sledge may move the backup GPT to the disk's end (gpt.relocate)
and add or replace a cloud-init seed entry (seedplan.plan_seed). Verify replays those
same pure planners on the image's own bytes, as the disk held them right after the
write, and compares the disk's table sectors with the result byte for byte. A table
sector that differs in any other way (an entry pointed elsewhere with its CRCs fixed,
garbage in LBA 1, a changed MBR entry, a stranger's backup at the disk's end) is drift;
no sector is accepted merely for being "a table sector".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from agent.disk.errors import SeedError
from agent.disk.gpt import relocate
from agent.disk.seedplan import MBR_TYPE, NAME, plan_seed, seed_candidates
from agent.disk.tables import GptHeader, Read, Tables, parse_header, read_tables
from agent.disk.vfat import is_seed_fat

MAX_SEED_GUESSES = 4  # seed entries on the disk worth replaying; a stranger could list thousands
Range = tuple[int, int]  # [start, end) in bytes


@dataclass(frozen=True)
class Edit:
    """One state sledge may have left the tables in: the writes on top of the image's bytes."""

    name: str
    writes: tuple[tuple[int, bytes], ...]
    free: tuple[Range, ...] = ()  # not compared: the seed's own FAT (per-instance content)


def as_written(image: Read, image_size: int, disk_size: int) -> Read:
    """The disk as the image left it: the image's bytes, zeros past its end (up to the disk's)."""

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, disk_size - offset))
        data = image(offset, min(length, image_size - offset)) if offset < image_size else b""
        return data + bytes(length - len(data))

    return read


def _seed_guesses(disk: Tables) -> list[tuple[int, bytes | None]]:
    """(seed size in bytes, GUID) of the seed partitions the disk's own tables show."""
    s = disk.sector
    if disk.primary is not None:
        if not disk.primary.valid:
            return []
        named = [e for e in disk.primary.used if e.name.lower() == NAME][:MAX_SEED_GUESSES]
        return [((e.last + 1 - e.first) * s, e.guid) for e in named]
    if disk.mbr is None:
        return []
    ends = [e for e in disk.mbr.primaries if e.kind == MBR_TYPE and e.last == disk.sectors - 1]
    return [(e.sectors * s, None) for e in ends[:MAX_SEED_GUESSES]]


def sledge_edits(image: Read, image_size: int, disk: Read, disk_size: int, sector: int) -> list[Edit]:
    """Every state sledge's own table edits may have left: as written, backup moved, seed added."""
    edits = [Edit("as written", ())]
    view = as_written(image, image_size, disk_size)
    base = read_tables(view, disk_size, sector)
    if disk_size > image_size:
        moved = relocate(base)
        if moved is not None:
            edits.append(Edit("backup GPT moved to the disk's end", tuple(moved.writes)))
    proven = frozenset(
        c.number
        for c in seed_candidates(base)
        if is_seed_fat(view(c.start * sector, 512), sector, c.start, c.sectors)
    )
    for size, guid in _seed_guesses(read_tables(disk, disk_size, sector)):
        try:
            placement = plan_seed(base, size, guid=guid, proven=proven)
        except SeedError:
            continue
        start_lba = placement.start // sector
        fat = is_seed_fat(disk(placement.start, 512), sector, start_lba, placement.size // sector)
        free = ((placement.start, placement.start + placement.size),) if fat else ()
        edits.append(Edit(f"cloud-init seed in partition {placement.number}", placement.writes, free))
    return edits


def apply(data: bytes, offset: int, writes: Sequence[tuple[int, bytes]]) -> bytes:
    """`data` (the bytes at `offset`) with the writes that overlap it laid on top."""
    out = bytearray(data)
    end = offset + len(out)
    for at, chunk in writes:
        lo, hi = max(at, offset), min(at + len(chunk), end)
        if lo < hi:
            out[lo - offset : hi - offset] = chunk[lo - at : hi - at]
    return bytes(out)


def same_outside(a: bytes, b: bytes, offset: int, free: Sequence[Range]) -> bool:
    """Whether a and b (both at `offset`) are equal outside the free ranges."""
    pos = 0
    for start, stop in sorted(free):
        start, stop = max(0, start - offset), min(len(a), stop - offset)
        if stop <= pos or start >= len(a):
            continue
        if a[pos:start] != b[pos:start]:
            return False
        pos = max(pos, stop)
    return a[pos:] == b[pos:]


def _header_fields(h: GptHeader) -> dict[str, object]:
    return {f.name: getattr(h, f.name) for f in fields(h) if f.name not in ("raw", "lba")}


def differences(expected: bytes, actual: bytes, offset: int, sector: int) -> list[str]:
    """Field by field, how the disk's bytes at `offset` differ from what sledge wrote there."""
    if expected == actual:
        return []
    lba = offset // sector
    if offset % sector == 0 and len(expected) == sector:
        want, got = parse_header(expected, lba), parse_header(actual, lba)
        if want is not None and got is None:
            return [f"LBA {lba}: expected a GPT header, found none (first bytes {actual[:8].hex()})"]
        if want is not None and got is not None:
            a, b = _header_fields(want), _header_fields(got)
            diff = [k for k in a if a[k] != b[k]]
            shown = (
                ", ".join(f"{k} {b[k]!r} (sledge wrote {a[k]!r})" for k in diff) or "bytes after the fields"
            )
            return [f"GPT header at LBA {lba}: {shown}"]
    if offset == 0 and len(expected) >= 512 and len(actual) >= 512:
        out = [
            f"MBR entry {i + 1}: {actual[446 + 16 * i : 462 + 16 * i].hex()} "
            f"(sledge wrote {expected[446 + 16 * i : 462 + 16 * i].hex()})"
            for i in range(4)
            if expected[446 + 16 * i : 462 + 16 * i] != actual[446 + 16 * i : 462 + 16 * i]
        ]
        if out:
            return out
    first = next(i for i in range(min(len(expected), len(actual))) if expected[i] != actual[i])
    return [f"bytes at {offset + first} (LBA {(offset + first) // sector}) differ from what sledge wrote"]


def beyond_image(edit: Edit, image_size: int, disk: Read, sector: int) -> list[str]:
    """The edit's writes past the image's end (which no chunk covers), checked on the disk."""
    problems: list[str] = []
    for at, data in edit.writes:
        if at + len(data) <= image_size:
            continue
        skip = max(0, image_size - at)
        offset, want = at + skip, data[skip:]
        got = disk(offset, len(want))
        if got != want:
            problems += differences(want, got, offset, sector)
    return problems
