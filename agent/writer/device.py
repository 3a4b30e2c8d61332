"""Opening the target: refuse what must not be written, then O_EXCL (and O_DIRECT).

A block device is refused when it is read-only, mounted (itself or a partition,
as a filesystem or swap), or held by md / LVM / device-mapper (sysfs holders);
opening it O_EXCL then makes the kernel refuse anything else that holds it. A
regular file is created sparse when absent or empty ("fresh": it reads as zeros).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent import blockdev
from agent.writer.errors import TargetError

DIRECT_ALIGN = 4096
ZERO_BUFFER = 4 << 20


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


@dataclass
class OpenTarget:
    path: str
    fd: int  # O_DIRECT where the target supports it
    buffered_fd: int  # for a tail that is not sector-aligned
    size: int
    is_block: bool
    fresh: bool
    zeroout_cheap: bool
    direct: bool
    align: int = DIRECT_ALIGN  # O_DIRECT lengths: 4 KiB, or the device's logical block if larger

    def fd_for(self, length: int) -> int:
        """The O_DIRECT fd for whole blocks from page-aligned buffers, else the buffered one."""
        return self.fd if self.direct and length % self.align == 0 else self.buffered_fd

    def write(self, data: bytes | memoryview, offset: int, aligned: bool = False) -> None:
        """Write all of `data` at `offset`; `aligned`: the caller's buffer is page-aligned."""
        pwrite_all(self.fd_for(len(data)) if aligned else self.buffered_fd, data, offset)

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: one BLKZEROOUT on a device (which never
        trusts discard), else zero writes where the device or file cannot."""
        if self.is_block:
            try:
                blockdev.zeroout(self.fd, offset, length)
                return
            except OSError:
                pass  # no zeroout here: write zeros
        zeros = mmap.mmap(-1, min(length, ZERO_BUFFER))  # page-aligned, reads as zeros
        try:
            view = memoryview(zeros)
            end = offset + length
            while offset < end:
                n = min(len(view), end - offset)
                self.write(view[:n], offset, aligned=True)
                offset += n
            view.release()
        finally:
            zeros.close()

    def close(self) -> None:
        for fd in {self.fd, self.buffered_fd}:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class SysPaths:
    sys: str = "/sys"
    proc: str = "/proc"


def _sysfs_dir(st: os.stat_result, paths: SysPaths) -> Path:
    return Path(paths.sys, "dev", "block", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve()


def _partitions(sysdir: Path) -> list[Path]:
    return [p for p in sysdir.iterdir() if (p / "partition").exists()] if sysdir.is_dir() else []


def busy_reasons(path: str, st: os.stat_result, paths: SysPaths = SysPaths()) -> list[str]:
    """Why a block device must not be written (empty list: nothing found)."""
    sysdir = _sysfs_dir(st, paths)
    reasons: list[str] = []
    devs = [sysdir, *_partitions(sysdir)]
    numbers = {}
    for d in devs:
        with contextlib.suppress(OSError):
            numbers[(d / "dev").read_text().strip()] = d.name
        holders = sorted(h.name for h in (d / "holders").iterdir()) if (d / "holders").is_dir() else []
        for holder in holders:
            kind = _holder_kind(Path(paths.sys, "class", "block", holder))
            reasons.append(f"{d.name} is held by {holder} ({kind})")
    with contextlib.suppress(OSError):
        for line in Path(paths.proc, "self", "mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[2] in numbers:
                reasons.append(f"{numbers[fields[2]]} is mounted on {fields[4]}")
    names = {f"/dev/{n}" for n in numbers.values()}
    for dev in _swaps(paths):
        if dev in names or os.path.realpath(dev) == os.path.realpath(path):
            reasons.append(f"{dev} is in use as swap")
    for d in devs[1:]:  # the whole device's own flag is checked on the open fd
        with contextlib.suppress(OSError):
            if (d / "ro").read_text().strip() == "1":
                reasons.append(f"{d.name} is read-only")
    for loop, backing in _loop_backers(paths):
        with contextlib.suppress(OSError):
            bst = os.stat(backing)
            number = f"{os.major(bst.st_rdev)}:{os.minor(bst.st_rdev)}"
            if stat.S_ISBLK(bst.st_mode) and number in numbers:
                reasons.append(f"{numbers[number]} backs loop device {loop}")
    return reasons


def file_busy_reasons(st: os.stat_result, paths: SysPaths = SysPaths()) -> list[str]:
    """Why a regular file must not be written: it backs a loop device, or is a swap file."""
    reasons: list[str] = []
    same = (st.st_dev, st.st_ino)
    for loop, backing in _loop_backers(paths):
        with contextlib.suppress(OSError):
            bst = os.stat(backing)
            if (bst.st_dev, bst.st_ino) == same:
                reasons.append(f"it backs loop device {loop}")
    for name in _swaps(paths):
        with contextlib.suppress(OSError):
            sst = os.stat(name)
            if (sst.st_dev, sst.st_ino) == same:
                reasons.append("it is in use as swap")
    return reasons


def _swaps(paths: SysPaths) -> list[str]:
    """The devices and files in use as swap (/proc/swaps, its octal escapes undone)."""
    try:
        lines = Path(paths.proc, "swaps").read_text().splitlines()[1:]
    except OSError:
        return []
    return [line.split()[0].replace("\\040", " ") for line in lines if line.split()]


def _loop_backers(paths: SysPaths) -> list[tuple[str, str]]:
    """(loop device, its backing file) for every attached loop device."""
    out = []
    for backing in sorted(Path(paths.sys, "block").glob("loop*/loop/backing_file")):
        with contextlib.suppress(OSError):
            out.append((backing.parent.parent.name, backing.read_text().strip().removesuffix(" (deleted)")))
    return out


def _holder_kind(holder: Path) -> str:
    name = holder.name
    if name.startswith("md"):
        return "md RAID"
    with contextlib.suppress(OSError):
        uuid = (holder / "dm" / "uuid").read_text().strip()
        if uuid.startswith("LVM-"):
            return "LVM"
        if uuid.startswith("CRYPT-"):
            return "dm-crypt"
        return "device-mapper"
    return "holder"


def zeroout_is_cheap(st: os.stat_result, paths: SysPaths = SysPaths()) -> bool:
    """The device zeroes without moving every byte (WRITE ZEROES; loop: fallocate)."""
    try:
        text = (_sysfs_dir(st, paths) / "queue" / "write_zeroes_max_bytes").read_text()
        return int(text) > 0
    except (OSError, ValueError):
        return False


def open_target(
    path: str, image_size: int, paths: SysPaths = SysPaths(), exact_file: bool = False
) -> OpenTarget:
    """`exact_file`: a regular file is made exactly `image_size` bytes, cut if longer (what
    `bmaptool copy` and `dd` leave: the file *is* the image afterwards)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
        if os.path.lexists(path):
            raise TargetError(f"target {path} is a dangling symlink (the device it named is gone)") from None
        if os.path.abspath(path).startswith("/dev/"):
            raise TargetError(
                f"target {path} does not exist (refusing to create a regular file under /dev)"
            ) from None
    if st is not None and stat.S_ISBLK(st.st_mode):
        return _open_block(path, st, image_size, paths)
    if st is None or stat.S_ISREG(st.st_mode):
        return _open_file(path, st, image_size, exact_file, paths)
    raise TargetError(f"target {path}: expected a block device or a regular file")


def open_for_read(path: str) -> OpenTarget:
    """Open a device or file only to read it (verify): nothing is refused, nothing written."""
    try:
        buffered = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"target {path}: {exc.strerror}") from None
    try:
        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError:
        fd, direct = buffered, False
    is_block = blockdev.is_block_device(buffered)
    align = max(DIRECT_ALIGN, blockdev.logical_sector_size(buffered)) if is_block else DIRECT_ALIGN
    return OpenTarget(path, fd, buffered, blockdev.size_of(buffered), is_block, False, False, direct, align)


def _open_block(path: str, st: os.stat_result, image_size: int, paths: SysPaths) -> OpenTarget:
    reasons = busy_reasons(path, st, paths)
    if reasons:
        raise TargetError(f"target {path} is in use, refusing to write: " + "; ".join(reasons))
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TargetError(f"target {path} is busy (held open exclusively, or mounted)") from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise TargetError(f"target {path}: cannot open for writing: {exc.strerror}") from None
        raise TargetError(f"target {path}: {exc.strerror}") from None
    try:
        if blockdev.is_read_only(fd):
            raise TargetError(f"target {path} is read-only")
        size = blockdev.size_of(fd)
        if size < image_size:
            raise TargetError(f"target {path}: image needs {image_size} bytes, device has {size}")
        buffered = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    align = max(DIRECT_ALIGN, blockdev.logical_sector_size(fd))
    return OpenTarget(path, fd, buffered, size, True, False, zeroout_is_cheap(st, paths), True, align)


def _open_file(
    path: str, st: os.stat_result | None, image_size: int, exact: bool, paths: SysPaths
) -> OpenTarget:
    reasons = file_busy_reasons(st, paths) if st is not None else []
    if reasons:
        raise TargetError(f"target {path} is in use, refusing to write: " + "; ".join(reasons))
    fresh = st is None or st.st_size == 0
    try:
        buffered = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise TargetError(f"target {path}: {exc.strerror}") from None
    try:
        size = os.fstat(buffered).st_size
        if size < image_size or (exact and size > image_size):
            os.ftruncate(buffered, image_size)
    except OSError as exc:
        os.close(buffered)
        raise TargetError(
            f"target {path}: cannot make it the image's {image_size} bytes: {exc.strerror}"
        ) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        direct = True
    except OSError:  # tmpfs and some filesystems have no O_DIRECT
        fd, direct = buffered, False
    return OpenTarget(path, fd, buffered, os.fstat(buffered).st_size, False, fresh, False, direct)
