"""Image sources for import: a raw file or block device, or anything qemu-img reads."""

from __future__ import annotations

import errno
import os
from typing import Protocol

from agent.blockdev import is_block_device, size_of
from controller.images.errors import ImageToolError
from controller.images.nbd import NbdClient, QemuNbdServer, data_ranges, image_info

# (offset, magic) -> qemu format name; anything else is raw.
_MAGICS = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
)


class SourceError(ImageToolError):
    pass


class ImageSource(Protocol):
    size: int
    format: str

    def data_ranges(self) -> list[tuple[int, int]]:
        """[start, end) ranges that may hold data; everything else reads as zeros."""
        ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def close(self) -> None: ...


class RawSource:
    format = "raw"

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(exc.errno, f"cannot open image source {path}: {exc.strerror}") from None
        self.size = size_of(self.fd)
        self._is_blockdev = is_block_device(self.fd)

    def data_ranges(self) -> list[tuple[int, int]]:
        if self._is_blockdev:
            return [(0, self.size)]
        ranges: list[tuple[int, int]] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end
                    break
                if exc.errno == errno.EINVAL:  # filesystem without SEEK_DATA
                    return [(pos, self.size)]
                raise
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            ranges.append((start, min(end, self.size)))
            pos = end
        return ranges

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise SourceError(
                errno.EIO,
                f"{self.path}: short read at offset {offset}: {len(data)} of {length} bytes",
            )
        return data

    def close(self) -> None:
        os.close(self.fd)


class QemuSource:
    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.format = fmt
        info = image_info(path)
        self.size = int(str(info["virtual-size"]))
        self._ranges = data_ranges(path, fmt)
        self._server = QemuNbdServer(path, fmt)
        try:
            self._client = NbdClient(self._server.socket_path)
        except BaseException:
            self._server.close()
            raise
        if self._client.size != self.size:
            self.close()
            raise SourceError(
                errno.EIO,
                f"{path}: qemu-nbd exports {self._client.size} bytes, qemu-img says {self.size}",
            )

    def data_ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def pread(self, length: int, offset: int) -> bytes:
        return self._client.pread(length, offset)

    def close(self) -> None:
        self._client.close()
        self._server.close()


def detect_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError as exc:
        raise SourceError(exc.errno, f"cannot open image source {path}: {exc.strerror}") from None
    for offset, magic, fmt in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    return "raw"


def open_source(path: str, fmt: str | None = None) -> ImageSource:
    fmt = fmt or detect_format(path)
    if fmt == "raw":
        return RawSource(path)
    return QemuSource(path, fmt)
