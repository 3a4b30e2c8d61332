"""The image's own table sectors, guessed back from a disk sledge deployed it to.

After a deploy, the chunks holding the GPT differ from the image only by sledge's own
edits: the backup moved to the disk's end (primary header's AlternateLBA and
LastUsableLBA, the protective MBR's size, the old backup header cleared) and a
cloud-init seed entry added past the image's end. A rebuild or a rollback would
download those chunks again for nothing. These are the writes that undo the edits on
the disk's bytes; the writer lays them over what it read and keeps the result only if
it hashes to the chunk's digest, so a wrong guess costs a download, never a wrong byte.
Pure: reads through `Read`, returns writes.
"""

from __future__ import annotations

import struct
import zlib

from agent.disk.gpt import _grow_protective_mbr, backup_of, seal_header
from agent.disk.seedplan import NAME
from agent.disk.tables import Read, read_tables

Writes = list[tuple[int, bytes]]  # (byte offset, data), all inside the image


def image_tables(disk: Read, image_size: int, disk_size: int, sector: int) -> Writes:
    """Writes that turn the disk's table sectors back into the image's, if sledge moved the
    backup GPT to a larger disk's end; [] when the disk shows no such move (nothing to undo)."""
    if disk_size <= image_size or image_size % sector:
        return []
    tables = read_tables(disk, disk_size, sector)
    copy = tables.primary
    if copy is None or not copy.valid or copy.entries is None:
        return []
    h = copy.header
    image_alt = image_size // sector - 1
    n = h.array_sectors(sector)
    array_end = (h.entries_lba + n) * sector
    if h.alt_lba != disk_size // sector - 1 or array_end > image_size or image_alt - n <= h.entries_lba:
        return []  # not a backup sledge moved, or tables that do not fit the image: no guess
    entries = bytearray(copy.entries)
    for entry in copy.used:
        if entry.name.lower() == NAME and entry.first * sector >= image_size:  # the seed sledge added
            entries[entry.slot * h.entry_size : (entry.slot + 1) * h.entry_size] = bytes(h.entry_size)
    header = bytearray(h.raw)
    struct.pack_into("<Q", header, 32, image_alt)
    struct.pack_into("<Q", header, 48, image_alt - n - 1)  # where sgdisk and parted end the usable area
    struct.pack_into("<I", header, 88, zlib.crc32(entries))
    seal_header(header, h.size)
    writes: Writes = [(sector, bytes(header)), (h.entries_lba * sector, bytes(entries))]
    # The image's backup header, which the move cleared; its array at the image's end is untouched.
    writes.append((image_alt * sector, backup_of(bytes(header), image_alt, image_alt - n)))
    if tables.mbr is not None:
        mbr = _grow_protective_mbr(tables.mbr.raw, image_alt + 1)  # shrinks it back, as well
        if mbr is not None:
            writes.append((0, mbr))
    return writes


def overlaps(writes: Writes, offset: int, length: int) -> bool:
    return any(at < offset + length and offset < at + len(data) for at, data in writes)


def lay_over(buf: memoryview, offset: int, writes: Writes) -> None:
    """Lay the writes that fall in [offset, offset + len(buf)) over buf, in place."""
    end = offset + len(buf)
    for at, data in writes:
        lo, hi = max(at, offset), min(at + len(data), end)
        if lo < hi:
            buf[lo - offset : hi - offset] = data[lo - at : hi - at]
