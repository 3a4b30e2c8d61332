"""The file-system edge of inspection: open the image, inspect it, resolve a permitted backing chain.

Every file is opened once, here, and inspected through that descriptor; the
sandbox (sandbox.py) then shows qemu exactly these descriptors, so a file renamed
or swapped after inspection is never the one qemu reads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from agent.blockdev import size_of
from controller.images.inspect import ALLOWED_FORMATS, Facts, ImageRefused, detect_format, inspect_image

MAX_CHAIN = 16  # layers, the image included


@dataclass(frozen=True)
class ImportPolicy:
    """allow_backing: the only directory backing files may come from (None: no backing files).
    inspect / pin_nodes exist so tests can switch a layer of the defence off and show the
    next one holding; the CLI always has both on."""

    allow_backing: str | None = None
    inspect: bool = True
    pin_nodes: bool = True


class FdBlob:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = size_of(fd)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.size:
            return b""
        return os.pread(self.fd, min(length, self.size - offset), offset)


@dataclass(frozen=True)
class Layer:
    path: str  # as resolved on the host, for messages and the import's output
    fd: int
    block_device: bool
    facts: Facts


@dataclass
class Inspected:
    """The image and its backing chain ([0] is the image), each open and inspected."""

    path: str
    layers: list[Layer] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.layers[0].facts.format

    @property
    def virtual_size(self) -> int:
        return self.layers[0].facts.virtual_size

    @property
    def backing_files(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers[1:])

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.fd)
        self.layers.clear()


def inspect_file(path: str, declared: str | None, policy: ImportPolicy) -> Inspected:
    result = Inspected(path)
    try:
        _walk(result, path, declared, policy)
    except BaseException:
        result.close()
        raise
    return result


def _walk(result: Inspected, path: str, declared: str | None, policy: ImportPolicy) -> None:
    fd, is_blk = _open(path)
    blob = FdBlob(fd)
    if not policy.inspect:
        fmt = declared or detect_format(blob)
        result.layers.append(Layer(path, fd, is_blk, Facts(fmt, -1)))
        return
    facts = _inspect(blob, declared, path, fd)
    result.layers.append(Layer(path, fd, is_blk, facts))
    seen = {_identity(fd)}
    while facts.backing is not None:
        top = result.layers[-1]
        name, backing_format = facts.backing, facts.backing_format
        where = _backing_path(top, name, backing_format, policy.allow_backing)
        if len(result.layers) >= MAX_CHAIN:
            raise ImageRefused(top.facts.format, f"backing chain longer than {MAX_CHAIN} at", name, top.path)
        assert policy.allow_backing is not None
        _check_path_under(where, policy.allow_backing, top, name)
        fd, is_blk = _open(where)
        real = _check_under(fd, policy.allow_backing, top, name)
        if _identity(fd) in seen:
            os.close(fd)
            raise ImageRefused(top.facts.format, "backing chain loops back to", name, top.path)
        seen.add(_identity(fd))
        facts = _inspect(FdBlob(fd), backing_format, real, fd)
        result.layers.append(Layer(real, fd, is_blk, facts))


def _inspect(blob: FdBlob, declared: str | None, path: str, fd: int) -> Facts:
    try:
        return inspect_image(blob, declared)
    except ImageRefused as exc:
        os.close(fd)
        raise exc.at(path) from None
    except OSError as exc:
        os.close(fd)
        raise ImageRefused(declared or "?", "cannot read the file:", exc.strerror, path) from None


def _backing_path(top: Layer, name: str, fmt: str | None, allow: str | None) -> str:
    """Where a backing file named in `top` lives, if policy lets it be read at all."""
    kind = top.facts.format

    def refuse(reason: str) -> ImageRefused:
        return ImageRefused(kind, reason, name, top.path)

    if allow is None:
        raise refuse(
            "backing file (qemu would open this second file; --allow-backing DIR permits files in DIR)"
        )
    head = name.split("/", 1)[0]
    if ":" in head or not name or "\0" in name:
        raise refuse("backing file is not a plain path (json:, protocols and the like are never followed):")
    if fmt is None:
        raise refuse("backing file without a declared format (qemu would guess it):")
    if fmt not in ALLOWED_FORMATS:
        raise refuse(f"backing file of format {fmt!r}, not on the allow-list:")
    base = os.path.dirname(top.path) if not top.block_device else "/"
    return os.path.join(base, name)


def _check_path_under(path: str, allow: str, top: Layer, name: str) -> None:
    real, root = os.path.realpath(path), os.path.realpath(allow)
    if os.path.commonpath([real, root]) != root:
        raise ImageRefused(
            top.facts.format,
            f"backing file outside --allow-backing {root} (resolves to {real}):",
            name,
            top.path,
        )


def _check_under(fd: int, allow: str, top: Layer, name: str) -> str:
    """The path the open descriptor really has must lie under the allowed directory
    (checked on the descriptor, so a symlink swapped in meanwhile changes nothing)."""
    real = os.readlink(f"/proc/self/fd/{fd}")
    root = os.path.realpath(allow)
    if os.path.commonpath([real, root]) != root or not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageRefused(
            top.facts.format,
            f"backing file outside --allow-backing {root} (resolves to {real}):",
            name,
            top.path,
        )
    return real


def _open(path: str) -> tuple[int, bool]:
    try:
        # O_NONBLOCK: a FIFO named as an image must not hang the import
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open image {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise OSError(f"image {path}: expected a regular file or a block device, got mode {oct(mode)}")
    return fd, stat.S_ISBLK(mode)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
