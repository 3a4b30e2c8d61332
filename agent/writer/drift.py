"""Telling real drift from the partition-table sectors sledge itself rewrites.

A deploy may change an image's table after writing it: the backup GPT moves to
the end of a larger disk (LBA 1 is updated, the old backup is cleared) and a
cloud-init seed adds an entry. A drift check that flagged those chunks would cry
wolf after every such deploy. So a chunk that differs is fetched and compared
byte for byte: when every differing byte lies in the table sectors the image
itself declares, it is "table updated", not drift.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.disk.gpt import gpt_entries_extent, is_gpt
from agent.image.manifest import Chunk

Range = tuple[int, int]  # [start, end) in image bytes


def table_ranges(head: bytes, image_size: int) -> list[Range]:
    """Byte ranges sledge may rewrite, from the image's first bytes (its own, not the disk's):
    for a GPT, the MBR's partition entries, the primary header, the primary entry array and the
    backup header and array where the image's header says they are; for an MBR disk, its
    signature and entries. Nothing else: boot code and the gaps between are drift if changed."""
    for sector in (512, 4096):
        if is_gpt(head, sector) and len(head) >= sector + 92:
            offset, length = gpt_entries_extent(head, sector)
            table = -(-length // sector) * sector
            (alt_lba,) = struct.unpack_from("<Q", head, sector + 32)
            backup_end = min(image_size, (alt_lba + 1) * sector)
            ranges = [(446, 512), (sector, 2 * sector), (offset, offset + table)]
            if backup_end > 2 * sector:
                ranges.append((max(2 * sector, backup_end - sector - table), backup_end))
            return ranges
    if head[510:512] == b"\x55\xaa":
        return [(440, 512)]  # disk signature and the four MBR entries
    return []


def only_in(ranges: Sequence[Range], chunk: Chunk, disk: bytes, image: bytes) -> bool:
    """Whether disk and image bytes of `chunk` differ only inside `ranges` (image offsets)."""
    pos = 0  # relative to the chunk
    for start, stop in sorted(ranges):
        start, stop = start - chunk.offset, stop - chunk.offset
        if stop <= pos or start >= chunk.length:
            continue
        if start > pos and disk[pos:start] != image[pos:start]:
            return False
        pos = max(pos, stop)
    return disk[pos:] == image[pos:]


@dataclass(frozen=True)
class Drift:
    drifted: list[Chunk]
    table_only: list[Chunk]


def classify(
    bad: Sequence[Chunk],
    image_size: int,
    head: bytes,
    read_disk: Callable[[Chunk], bytes],
    fetch: Callable[[Chunk], bytes],
) -> Drift:
    """Split the differing chunks. `head`: the image's first chunk; `fetch`: a chunk's verified bytes."""
    ranges = table_ranges(head, image_size)
    drifted, table_only = [], []
    for chunk in bad:
        touches = any(start < chunk.offset + chunk.length and stop > chunk.offset for start, stop in ranges)
        if touches and only_in(ranges, chunk, read_disk(chunk), fetch(chunk)):
            table_only.append(chunk)
        else:
            drifted.append(chunk)
    return Drift(drifted, table_only)
