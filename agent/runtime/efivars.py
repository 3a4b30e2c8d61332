"""Boot entries in NVRAM through efivarfs (/sys/firmware/efi/efivars), as efibootmgr writes them.

The decisions are agent.disk.efiboot's; this module reads the variables, writes the planned
Boot#### and BootOrder, and reports. A variable file is its 4-byte attributes followed by the
value, written in one write(); the kernel marks most efivarfs files immutable, so the flag is
cleared before an existing variable is replaced (what efibootmgr and chattr -i do).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent import blockdev
from agent.disk.efiboot import (
    GLOBAL_VARIABLE,
    VARIABLE_ATTRIBUTES,
    EfiBootError,
    EntryPlan,
    LoaderPath,
    decode_boot_order,
    encode_boot_order,
    esp_verdict,
    plan_entry,
)
from agent.disk.tables import read_tables

EFI = Path("/sys/firmware/efi")
EFIVARS = EFI / "efivars"
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
_BOOT = re.compile(rf"^Boot([0-9A-F]{{4}})-{GLOBAL_VARIABLE}$")


class EfiVarsError(EfiBootError):
    """efivarfs cannot be read or written (OS error, with the path)."""


@dataclass(frozen=True)
class EntryReport:
    name: str  # Boot####
    path: str
    order: tuple[int, ...]
    reused: bool

    def describe(self) -> str:
        verb = "updated" if self.reused else "added"
        order = ",".join(f"{n:04X}" for n in self.order)
        return f"UEFI boot entry {verb}: {self.name} for {self.path}; BootOrder {order}"


def _read(path: Path) -> bytes | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EfiVarsError(f"{path}: {exc.strerror}") from None
    return raw[4:]  # the attributes


def _write(path: Path, value: bytes) -> None:
    try:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                flags = bytearray(struct.pack("i", 0))
                fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
                (current,) = struct.unpack("i", flags)
                if current & FS_IMMUTABLE_FL:
                    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", current & ~FS_IMMUTABLE_FL))
            except OSError as exc:
                if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            finally:
                os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = struct.pack("<I", VARIABLE_ATTRIBUTES) + value
            if os.write(fd, data) != len(data):
                raise EfiVarsError(f"{path}: short write of {len(data)} bytes")
        finally:
            os.close(fd)
    except OSError as exc:
        raise EfiVarsError(f"{path}: {exc.strerror}") from None


def add_boot_entry(loader: LoaderPath, description: str, root: Path = EFIVARS) -> EntryReport:
    """Add (or refresh) the entry for loader right after BootCurrent in BootOrder."""
    if not root.is_dir():
        raise EfiVarsError(f"{root}: not a directory: booted without UEFI, or efivarfs is not mounted")
    entries: dict[int, bytes] = {}
    for child in root.iterdir():
        if (m := _BOOT.match(child.name)) is not None:
            value = _read(child)
            if value is not None:
                entries[int(m.group(1), 16)] = value
    order_raw = _read(root / f"BootOrder-{GLOBAL_VARIABLE}") or b""
    current_raw = _read(root / f"BootCurrent-{GLOBAL_VARIABLE}")
    current = struct.unpack("<H", current_raw)[0] if current_raw and len(current_raw) == 2 else None
    plan: EntryPlan = plan_entry(loader, description, entries, decode_boot_order(order_raw), current)
    _write(root / f"{plan.name}-{GLOBAL_VARIABLE}", plan.option)
    _write(root / f"BootOrder-{GLOBAL_VARIABLE}", encode_boot_order(plan.order))
    return EntryReport(plan.name, loader.path, plan.order, plan.reused)


def mount_efivarfs(path: Path = EFIVARS) -> None:
    """The live image mounts only proc, sys and dev: efivarfs (a module) comes up on first use."""
    if os.path.ismount(path):
        return
    subprocess.run(["modprobe", "-q", "efivarfs"], check=False, capture_output=True)
    done = subprocess.run(["mount", "-t", "efivarfs", "efivarfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise EfiVarsError(f"{path}: mount -t efivarfs failed: {done.stderr.strip() or done.returncode}")


def boot_entry_for(device: str, description: str, efi: Path = EFI) -> str:
    """After a deploy to device: add the NVRAM entry its image needs, if any (only when this machine
    booted through UEFI; a BIOS machine has no NVRAM entries). Returns what was done, for the report."""
    if not efi.is_dir():
        return ""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EfiVarsError(f"{device}: {exc.strerror}") from None
    try:

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        tables = read_tables(read, blockdev.size_of(fd), blockdev.logical_sector_size(fd))
        verdict = esp_verdict(tables, read)
    except OSError as exc:
        raise EfiVarsError(f"{device}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if verdict.loader is None:
        return f"no UEFI boot entry needed: {verdict.detail}"
    if efi == EFI:
        mount_efivarfs(efi / "efivars")
    return add_boot_entry(verdict.loader, description, efi / "efivars").describe()
