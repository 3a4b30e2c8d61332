"""Inspecting an image file before qemu reads a byte of it: pure parsers over its bytes.

An image is untrusted input. qcow2, VMDK and friends can name other files (backing
files, external data files, extents, parents), and qemu opens those too, so an
import of a hostile image could copy any file the controller can read into the
store (the class of CVE-2024-32498 and CVE-2022-47951). These parsers read the
same header fields qemu acts on and refuse every reference to a second file;
formats are an allow-list. The only reference let through is a qcow2 backing file,
and only for the caller (controller/images/chain.py) to resolve under a directory
the operator named. The vmdk and vhdx parsers are in inspect_vmdk.py and
inspect_vhdx.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from controller.images.errors import ImageToolError

ALLOWED_FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vdi")

# (offset, magic, format) for every format qemu probes that we can recognise; a
# format not on the allow-list is refused by name rather than imported as raw bytes.
MAGICS = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk3"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (64, struct.pack("<I", 0xBEDA107F), "vdi"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)


class ImageRefused(ImageToolError, ValueError):
    """An image sledge will not hand to qemu: names the file, the format and the reference."""

    def __init__(self, fmt: str, reason: str, reference: str | None = None, path: str = "") -> None:
        self.format = fmt
        self.reason = reason
        self.reference = reference
        self.path = path
        super().__init__(str(self))

    def at(self, path: str) -> ImageRefused:
        return ImageRefused(self.format, self.reason, self.reference, path)

    def __str__(self) -> str:
        where = f"image {self.path} ({self.format})" if self.path else f"{self.format} image"
        ref = f" {self.reference!r}" if self.reference is not None else ""
        return f"{where} refused: {self.reason}{ref}"


class Blob(Protocol):
    """Random access to the file under inspection; reads past the end come back short."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class BytesBlob:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length] if offset >= 0 and length >= 0 else b""


@dataclass(frozen=True)
class Facts:
    """What inspection found: the format, its virtual size and (qcow2 only) a backing file."""

    format: str
    virtual_size: int
    backing: str | None = None
    backing_format: str | None = None


def detect_format(blob: Blob) -> str:
    head = blob.read(0, 128)
    for offset, magic, fmt in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    return "raw"


def inspect_image(blob: Blob, declared: str | None = None) -> Facts:
    """Facts about one file, or ImageRefused. A declared format must agree with the file,
    except raw, which is always raw: its bytes are copied, never interpreted."""
    # imported here: those modules build on this one's error and Blob
    from controller.images.inspect_vhdx import inspect_vhdx
    from controller.images.inspect_vmdk import inspect_vmdk

    detected = detect_format(blob)
    fmt = declared or detected
    if fmt not in ALLOWED_FORMATS:
        raise ImageRefused(fmt, f"format not on the allow-list ({', '.join(ALLOWED_FORMATS)})")
    if fmt == "raw":
        return Facts("raw", blob.size)
    if detected != fmt:
        raise ImageRefused(fmt, "declared format does not match the file, which looks like", detected)
    parsers = {"qcow2": inspect_qcow2, "vmdk": inspect_vmdk, "vhdx": inspect_vhdx, "vdi": inspect_vdi}
    try:
        return parsers[fmt](blob)
    except (struct.error, ValueError, OverflowError, IndexError) as exc:
        if isinstance(exc, ImageRefused):
            raise
        raise ImageRefused(fmt, "malformed header", str(exc)) from None


def need(data: bytes, length: int, fmt: str, what: str) -> bytes:
    if len(data) < length:
        raise ImageRefused(
            fmt, f"file too short for its {what}: expected {length} bytes, got", str(len(data))
        )
    return data


# --- qcow2 (docs/interop/qcow2.txt in qemu) -------------------------------------------------

QCOW2_EXT_END = 0
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_KNOWN = 0x1F  # dirty, corrupt, data file, compression type, extended L2
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1


def inspect_qcow2(blob: Blob) -> Facts:
    head = need(blob.read(0, 104), 72, "qcow2", "header")
    _, version, backing_offset, backing_size, cluster_bits, size, crypt = struct.unpack(
        ">4sIQIIQI", head[:36]
    )
    if version not in (2, 3):
        raise ImageRefused("qcow2", "unknown version", str(version))
    if not 9 <= cluster_bits <= 21:
        raise ImageRefused("qcow2", "cluster bits out of range 9..21", str(cluster_bits))
    cluster = 1 << cluster_bits
    incompat = autoclear = 0
    header_length = 72
    if version == 3:
        need(head, 104, "qcow2", "version 3 header")
        incompat, _, autoclear, _, header_length = struct.unpack(">QQQII", head[72:104])
        if header_length < 104 or header_length % 8 or header_length > cluster:
            raise ImageRefused("qcow2", "header length out of range", str(header_length))
    if crypt:
        raise ImageRefused("qcow2", "encrypted images are not imported (encryption method)", str(crypt))
    # qemu reads extensions up to the backing file name, or to the end of the first cluster
    ext_end = backing_offset if backing_offset else cluster
    if backing_offset > cluster:
        raise ImageRefused("qcow2", "backing file name offset beyond the first cluster", str(backing_offset))
    data_file, backing_format = _qcow2_extensions(blob.read(header_length, max(0, ext_end - header_length)))
    if incompat & QCOW2_INCOMPAT_DATA_FILE or data_file is not None:
        raise ImageRefused("qcow2", "external data file", data_file if data_file is not None else "<unnamed>")
    if autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        raise ImageRefused("qcow2", "external data file (data_file_raw set)", data_file or "<unnamed>")
    if incompat & ~QCOW2_INCOMPAT_KNOWN:
        raise ImageRefused(
            "qcow2", "unknown incompatible feature bits", hex(incompat & ~QCOW2_INCOMPAT_KNOWN)
        )
    backing = None
    if backing_offset and backing_size:
        if backing_size > 1023 or backing_offset + backing_size > cluster:
            raise ImageRefused(
                "qcow2", "backing file name too long or past the first cluster", str(backing_size)
            )
        raw_name = need(blob.read(backing_offset, backing_size), backing_size, "qcow2", "backing file name")
        backing = raw_name.decode("utf-8", errors="backslashreplace")
    return Facts("qcow2", size, backing, backing_format)


def _qcow2_extensions(area: bytes) -> tuple[str | None, str | None]:
    data_file: str | None = None
    backing_format: str | None = None
    pos = 0
    while pos + 8 <= len(area):
        kind, length = struct.unpack(">II", area[pos : pos + 8])
        if kind == QCOW2_EXT_END:
            break
        body = area[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ImageRefused("qcow2", "header extension runs past its area", hex(kind))
        text = body.decode("utf-8", errors="backslashreplace")
        if kind == QCOW2_EXT_DATA_FILE:
            data_file = text
        elif kind == QCOW2_EXT_BACKING_FORMAT:
            backing_format = text
        pos += 8 + (length + 7) // 8 * 8
    return data_file, backing_format


# --- vdi (qemu block/vdi.c; VirtualBox's VDIHeader1) ----------------------------------------

VDI_SIGNATURE = 0xBEDA107F
VDI_TYPES = {1: "dynamic", 2: "fixed"}  # 3 undo and 4 differencing name a parent image


def inspect_vdi(blob: Blob) -> Facts:
    head = need(blob.read(0, 456), 456, "vdi", "header")
    signature, version, _, image_type = struct.unpack("<IIII", head[64:80])
    if signature != VDI_SIGNATURE:
        raise ImageRefused("vdi", "bad signature", hex(signature))
    if version >> 16 != 1:
        raise ImageRefused("vdi", "unknown version", hex(version))
    if image_type not in VDI_TYPES:
        parent = head[440:456].hex()
        raise ImageRefused("vdi", f"image type {image_type} (undo/differencing) names a parent image", parent)
    (disk_size,) = struct.unpack("<Q", head[368:376])
    return Facts("vdi", disk_size)
