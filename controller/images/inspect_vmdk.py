"""VMDK inspection: only a self-contained sparse file (monolithicSparse, streamOptimized).

What makes qemu (block/vmdk.c) open a second file, and so is refused here:
- a text descriptor (any VMDK that does not start with the sparse magic): its extent
  lines name the files holding the data (monolithicFlat, twoGbMaxExtent*, vmfs...);
- a sparse header whose capacity is 0 with a descriptor offset: qemu then reads the
  embedded descriptor as a text descriptor, extent lines and all;
- a `parentFileNameHint` in the descriptor area qemu searches (the 10 KiB at byte
  512, whatever the header says) or in the embedded descriptor: the parent becomes
  the backing file;
- streamOptimized files keep their real header in a footer (gdOffset = -1): qemu
  then uses the footer's header, so both are checked.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from controller.images.inspect import Blob, Facts, ImageRefused, need

SECTOR = 512
GD_AT_END = 0xFFFFFFFFFFFFFFFF
PARENT_AREA = (0x200, 20 * SECTOR)  # where qemu's vmdk_parent_open looks for the parent hint
MAX_DESCRIPTOR = 1 << 20
SPARSE_TYPES = ("monolithicSparse", "streamOptimized")
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # magic .. compressAlgorithm, 79 bytes

_EXTENT = re.compile(rb'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\S+)(?:\s+"([^"\r\n]*)")?', re.MULTILINE)
_CREATE_TYPE = re.compile(rb'^\s*createType\s*=\s*"([^"\r\n]*)"', re.MULTILINE)


@dataclass(frozen=True)
class Descriptor:
    create_type: str | None
    extents: tuple[tuple[str, str], ...]  # (type, file name or "")
    parent_hint: str | None


def parse_descriptor(text: bytes) -> Descriptor:
    """The fields of a VMDK text descriptor that decide which files qemu opens."""
    text = text.split(b"\0", 1)[0]
    m = _CREATE_TYPE.search(text)
    create_type = m.group(1).decode("utf-8", "backslashreplace") if m else None
    extents = tuple(
        (
            e.group(3).decode("utf-8", "backslashreplace"),
            (e.group(4) or b"").decode("utf-8", "backslashreplace"),
        )
        for e in _EXTENT.finditer(text)
    )
    return Descriptor(create_type, extents, _parent_hint(text))


def _parent_hint(text: bytes) -> str | None:
    # qemu looks for the bare key anywhere in the area, so any mention counts
    i = text.find(b"parentFileNameHint")
    if i < 0:
        return None
    m = re.match(rb'parentFileNameHint\s*=\s*"([^"\r\n]*)', text[i:])
    value = m.group(1) if m else text[i : i + 80]
    return value.decode("utf-8", "backslashreplace")


def inspect_vmdk(blob: Blob) -> Facts:
    head = blob.read(0, SECTOR)
    if head[:4] != b"KDMV":
        desc = parse_descriptor(blob.read(0, MAX_DESCRIPTOR))
        raise ImageRefused(
            "vmdk",
            f"a text descriptor (createType {desc.create_type!r}) reads its data from other files "
            "(import the flat extent as raw instead); extents:",
            ", ".join(name for _, name in desc.extents) or "<none parsed>",
        )
    need(head, HEADER.size, "vmdk", "sparse header")
    header = HEADER.unpack(head[: HEADER.size])
    gd_offset = header[9]
    headers = [header]
    if gd_offset == GD_AT_END:
        footer = need(blob.read(blob.size - 3 * SECTOR, 3 * SECTOR), 3 * SECTOR, "vmdk", "footer")
        if footer[SECTOR : SECTOR + 4] != b"KDMV":
            raise ImageRefused(
                "vmdk", "streamOptimized footer without the sparse magic", footer[512:516].hex()
            )
        headers.append(HEADER.unpack(footer[SECTOR : SECTOR + HEADER.size]))
    for h in reversed(headers):  # the footer first: it is the header qemu uses
        _check_header(blob, h)
    hint = _parent_hint(blob.read(*PARENT_AREA))
    if hint is not None:
        raise ImageRefused("vmdk", "parent disk (parentFileNameHint)", hint)
    capacity = headers[-1][3]
    return Facts("vmdk", capacity * SECTOR)


def _check_header(blob: Blob, h: tuple[object, ...]) -> None:
    version, capacity, desc_offset, desc_size = h[1], h[3], h[5], h[6]
    assert isinstance(version, int) and isinstance(capacity, int)
    assert isinstance(desc_offset, int) and isinstance(desc_size, int)
    if version > 3:
        raise ImageRefused("vmdk", "unknown sparse header version", str(version))
    if not desc_offset:
        return
    length = min(desc_size * SECTOR, MAX_DESCRIPTOR)
    desc = parse_descriptor(blob.read(desc_offset * SECTOR, length))
    if capacity == 0:
        raise ImageRefused(
            "vmdk",
            "sparse header of capacity 0: qemu reads the embedded descriptor's extents:",
            ", ".join(name for _, name in desc.extents) or "<none parsed>",
        )
    if desc.parent_hint is not None:
        raise ImageRefused("vmdk", "parent disk (parentFileNameHint)", desc.parent_hint)
    if desc.create_type is not None and desc.create_type not in SPARSE_TYPES:
        raise ImageRefused("vmdk", "createType not monolithicSparse/streamOptimized:", desc.create_type)
    # qemu 7.2 ignores these extent lines (the file is its own extent), but a sparse file
    # only ever has its one SPARSE line: anything more is a reference in waiting
    if len(desc.extents) > 1 or any(kind != "SPARSE" for kind, _ in desc.extents):
        raise ImageRefused(
            "vmdk",
            "embedded descriptor names extents besides its own:",
            ", ".join(n for _, n in desc.extents),
        )
