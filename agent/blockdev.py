"""Block-device ioctls and facts, wrapped once, at the edge."""

from __future__ import annotations

import fcntl
import os
import stat
import struct

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
BLKSSZGET = 0x1268
BLKROGET = 0x125E


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def size_of(fd: int) -> int:
    """Size in bytes of a block device or regular file."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])
    return os.fstat(fd).st_size


def logical_sector_size(fd: int) -> int:
    if not is_block_device(fd):
        return 512
    buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    return int(struct.unpack("i", buf)[0])


def is_read_only(fd: int) -> bool:
    buf = fcntl.ioctl(fd, BLKROGET, b"\0" * 4)
    return bool(struct.unpack("i", buf)[0])


def zeroout(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT: the device guarantees zeros afterwards (unlike discard)."""
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
