"""Image sources for import: a raw file or block device, or anything qemu-img reads."""

from __future__ import annotations

import errno
import os
from typing import Protocol

from agent.blockdev import is_block_device, size_of
from controller.images.chain import ImportPolicy, Inspected, inspect_file
from controller.images.errors import ImageToolError
from controller.images.nbd import NbdClient, QemuNbdServer, data_ranges, image_info
from controller.images.sandbox import SandboxedImage, SandboxLayer


class SourceError(ImageToolError):
    pass


class ImageSource(Protocol):
    size: int
    format: str
    backing_files: tuple[str, ...]  # files read besides the image (--allow-backing)

    def data_ranges(self) -> list[tuple[int, int]]:
        """[start, end) ranges that may hold data; everything else reads as zeros."""
        ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def close(self) -> None: ...


class RawSource:
    format = "raw"
    backing_files: tuple[str, ...] = ()

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
    """An inspected image read through qemu-nbd in the sandbox; owns the inspected descriptors."""

    def __init__(self, inspected: Inspected, policy: ImportPolicy) -> None:
        self.path = inspected.path
        self.format = inspected.format
        self.backing_files = inspected.backing_files
        self._inspected = inspected
        image = SandboxedImage(
            tuple(SandboxLayer(x.fd, x.block_device, x.facts.format) for x in inspected.layers),
            pin_nodes=policy.pin_nodes,
        )
        info = image_info(image)
        self.size = int(str(info["virtual-size"]))
        if policy.inspect and self.size != inspected.virtual_size:
            raise SourceError(
                errno.EINVAL,
                f"image {self.path} ({self.format}): qemu reports a virtual size of {self.size} bytes, "
                f"its header says {inspected.virtual_size}",
            )
        self._ranges = data_ranges(image)
        self._server = QemuNbdServer(self.path, image)
        try:
            self._client = NbdClient(self._server.socket_path)
        except BaseException:
            self._server.close()
            raise
        if self._client.size != self.size:
            self.close()
            raise SourceError(
                errno.EIO,
                f"{self.path}: qemu-nbd exports {self._client.size} bytes, qemu-img says {self.size}",
            )

    def data_ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def pread(self, length: int, offset: int) -> bytes:
        return self._client.pread(length, offset)

    def close(self) -> None:
        self._client.close()
        self._server.close()
        self._inspected.close()


def open_source(path: str, fmt: str | None = None, policy: ImportPolicy | None = None) -> ImageSource:
    """Inspect the image (and any backing chain the policy permits), then open it for reading:
    raw bytes directly, anything else through sandboxed qemu. Raises ImageRefused."""
    policy = policy or ImportPolicy()
    inspected = inspect_file(path, fmt, policy)
    try:
        if inspected.format == "raw":
            inspected.close()
            return RawSource(path)
        return QemuSource(inspected, policy)
    except BaseException:
        inspected.close()
        raise
