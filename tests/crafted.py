"""Image headers built byte by byte, for the inspector's table tests and hostile imports.

Each builder writes the fields the format's specification (or qemu's reader) defines
and nothing more; a qemu-made file is used where qemu itself must open the result.
"""

from __future__ import annotations

import struct
import uuid

from controller.images import inspect_vhdx as vhdx

KiB, MiB = 1 << 10, 1 << 20


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)


def qcow2(
    size: int = MiB,
    *,
    version: int = 3,
    cluster_bits: int = 16,
    backing: bytes = b"",
    backing_format: bytes | None = None,
    data_file: bytes | None = None,
    incompat: int = 0,
    autoclear: int = 0,
    crypt: int = 0,
) -> bytes:
    header_length = 104 if version == 3 else 72
    exts = b""
    if backing_format is not None:
        exts += _ext(0xE2792ACA, backing_format)
    if data_file is not None:
        exts += _ext(0x44415441, data_file)
    exts += struct.pack(">II", 0, 0)
    backing_offset = header_length + len(exts) if backing else 0
    cluster = 1 << cluster_bits
    head = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        backing_offset,
        len(backing),
        cluster_bits,
        size,
        crypt,
        0,
        0,
        cluster,
        1,
        0,
        0,
    )
    if version == 3:
        head += struct.pack(">QQQII", incompat, 0, autoclear, 4, header_length)
    body = head + exts + backing
    return body + bytes(max(0, cluster - len(body)))


def vmdk_descriptor(
    create_type: str = "monolithicSparse", extents: str = 'RW 2048 SPARSE "x.vmdk"', extra: str = ""
) -> bytes:
    return (
        f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{create_type}"\n'
        f"{extra}\n# Extent description\n{extents}\n\n# The Disk Data Base\n#DDB\n"
    ).encode()


def vmdk_sparse(
    capacity: int = 2048,
    descriptor: bytes | None = None,
    *,
    version: int = 1,
    gd_at_end: bool = False,
    footer_capacity: int | None = None,
) -> bytes:
    """A sparse VMDK header, its descriptor at sector 1 (20 sectors), and for streamOptimized
    (gd_at_end) the footer qemu reads from the end of the file."""
    if descriptor is None:
        descriptor = vmdk_descriptor()

    def header(cap: int, gd: int) -> bytes:
        return struct.pack(
            "<4sIIQQQQIQQQB4sH", b"KDMV", version, 3, cap, 128, 1, 20, 512, 0, gd, 128, 0, b"\n \r\n", 0
        )

    gd = 0xFFFFFFFFFFFFFFFF if gd_at_end else 21
    data = header(capacity, gd).ljust(512, b"\0") + descriptor.ljust(20 * 512, b"\0")[: 20 * 512]
    if gd_at_end:
        cap = capacity if footer_capacity is None else footer_capacity
        marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
        data += bytes(512) + marker + header(cap, 21).ljust(512, b"\0") + bytes(512)
    return data


def vdi(image_type: int = 1, size: int = 3 * MiB, parent: bytes = bytes(16)) -> bytes:
    head = bytearray(512)
    head[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    struct.pack_into("<IIII", head, 64, 0xBEDA107F, 0x00010001, 400, image_type)
    struct.pack_into("<Q", head, 368, size)
    head[440:456] = parent
    return bytes(head)


def vhdx_image(
    size: int = 8 * MiB,
    *,
    file_flags: int = 0,
    parent_locator: dict[str, str] | None = None,
    unknown_item_required: bool = False,
    unknown_region_required: bool = False,
) -> bytes:
    """File identifier, the region table at 192 KiB, a metadata region at 1 MiB."""
    data = bytearray(2 * MiB)
    data[:8] = b"vhdxfile"
    regions = [(vhdx.BAT, 1536 * KiB, MiB, 1), (vhdx.METADATA, MiB, MiB, 1)]
    if unknown_region_required:
        regions.append((uuid.UUID(int=7), 1800 * KiB, 4096, 1))
    struct.pack_into("<4sIII", data, 192 * KiB, b"regi", 0, len(regions), 0)
    for i, (guid, offset, length, flags) in enumerate(regions):
        struct.pack_into("<16sQII", data, 192 * KiB + 16 + 32 * i, guid.bytes_le, offset, length, flags)
    items: list[tuple[uuid.UUID, bytes, int]] = [
        (vhdx.FILE_PARAMETERS, struct.pack("<II", 32 * MiB, file_flags), 4),
        (vhdx.VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
        (vhdx.LOGICAL_SECTOR, struct.pack("<I", 512), 6),
    ]
    if unknown_item_required:
        items.append((uuid.UUID(int=9), b"x" * 8, 4))
    if parent_locator is not None:
        items.append((vhdx.PARENT_LOCATOR, _locator(parent_locator), 6))
    struct.pack_into("<8sHH", data, MiB, b"metadata", 0, len(items))
    at = 64 * KiB
    for i, (guid, body, flags) in enumerate(items):
        struct.pack_into("<16sIII", data, MiB + 32 + 32 * i, guid.bytes_le, at, len(body), flags)
        data[MiB + at : MiB + at + len(body)] = body
        at += 4096
    return bytes(data)


def _locator(pairs: dict[str, str]) -> bytes:
    head = bytearray(uuid.UUID(int=3).bytes_le + struct.pack("<HH", 0, len(pairs)))
    strings = b""
    base = 20 + 12 * len(pairs)
    entries = b""
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        entries += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(k), len(k), len(v))
        strings += k + v
    return bytes(head) + entries + strings
