"""VHDX inspection ([MS-VHDX]; qemu block/vhdx.c): no differencing disks, nothing unknown.

A differencing VHDX names its parent in a parent locator (relative and absolute
paths). qemu 7.2 refuses to open one, but a later qemu or another tool may not, so
it is refused here by the file's own flags, as are metadata items or regions marked
required that we do not know (the format says a reader must then fail).
Region table: the one at 192 KiB, the only one qemu reads.
"""

from __future__ import annotations

import struct
import uuid

from controller.images.inspect import Blob, Facts, ImageRefused, need

KiB = 1 << 10
REGION_TABLE = 192 * KiB
MAX_ENTRIES = 2047
BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_ITEMS = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83, LOGICAL_SECTOR, PHYSICAL_SECTOR}
HAS_PARENT = 1 << 1
IS_REQUIRED = 1 << 2


def inspect_vhdx(blob: Blob) -> Facts:
    need(blob.read(0, 8), 8, "vhdx", "file identifier")
    table = need(blob.read(REGION_TABLE, 16), 16, "vhdx", "region table header")
    signature, _, count, _ = struct.unpack("<4sIII", table)
    if signature != b"regi" or count > MAX_ENTRIES:
        raise ImageRefused("vhdx", "bad region table (signature, entry count)", f"{signature!r}, {count}")
    entries = need(blob.read(REGION_TABLE + 16, 32 * count), 32 * count, "vhdx", "region table")
    metadata: tuple[int, int] | None = None
    for i in range(count):
        guid_le, offset, length, flags = struct.unpack("<16sQII", entries[32 * i : 32 * i + 32])
        guid = uuid.UUID(bytes_le=guid_le)
        if guid == METADATA:
            metadata = (offset, length)
        elif guid != BAT and flags & 1:
            raise ImageRefused("vhdx", "unknown required region", str(guid))
    if metadata is None:
        raise ImageRefused("vhdx", "no metadata region", None)
    return _metadata(blob, *metadata)


def _metadata(blob: Blob, start: int, length: int) -> Facts:
    head = need(blob.read(start, 32), 32, "vhdx", "metadata table")
    signature, _, count = struct.unpack("<8sHH", head[:12])
    if signature != b"metadata" or count > MAX_ENTRIES:
        raise ImageRefused("vhdx", "bad metadata table (signature, entry count)", f"{signature!r}, {count}")
    entries = need(blob.read(start + 32, 32 * count), 32 * count, "vhdx", "metadata table")
    size: int | None = None
    file_flags = 0
    for i in range(count):
        guid_le, offset, _length, flags = struct.unpack("<16sIII", entries[32 * i : 32 * i + 28])
        item = uuid.UUID(bytes_le=guid_le)
        if item == PARENT_LOCATOR:
            raise ImageRefused(
                "vhdx", "parent locator (a differencing disk) naming", _locator(blob, start + offset)
            )
        if item == VIRTUAL_DISK_SIZE:
            (size,) = struct.unpack("<Q", need(blob.read(start + offset, 8), 8, "vhdx", "virtual disk size"))
        elif item == FILE_PARAMETERS:
            params = need(blob.read(start + offset, 8), 8, "vhdx", "file parameters")
            file_flags = struct.unpack("<II", params)[1]
        elif item not in KNOWN_ITEMS and flags & IS_REQUIRED:
            raise ImageRefused("vhdx", "unknown required metadata item", str(item))
    if file_flags & HAS_PARENT:
        raise ImageRefused("vhdx", "differencing disk (HasParent) without a readable parent locator", None)
    if size is None:
        raise ImageRefused("vhdx", "no virtual disk size in the metadata", None)
    return Facts("vhdx", size)


def _locator(blob: Blob, at: int) -> str:
    """The locator's key=value pairs (parent paths), best effort: the refusal stands anyway."""
    head = blob.read(at, 20)
    if len(head) < 20:
        return "<unreadable>"
    (count,) = struct.unpack("<H", head[18:20])
    pairs = []
    for i in range(min(count, 16)):
        entry = blob.read(at + 20 + 12 * i, 12)
        if len(entry) < 12:
            break
        key_off, value_off, key_len, value_len = struct.unpack("<IIHH", entry)
        key = blob.read(at + key_off, key_len).decode("utf-16-le", "replace")
        value = blob.read(at + value_off, value_len).decode("utf-16-le", "replace")
        pairs.append(f"{key}={value}")
    return ", ".join(pairs) or "<no entries>"
