"""Did a write put the image on the device? Byte for byte, except the GPT edits sledge makes.

sledge's writer fixes a GPT image for a device larger than the disk the image was built for, as
`sgdisk -e` would (agent/disk/gpt.py): the backup header and table move to the device's end, so
the primary header's AlternateLBA, LastUsableLBA and CRC change, the protective MBR's size grows,
and the old backup header is cleared. `cmp` calls that a difference; it is not. This check works
out, on its own from the image's bytes (not with the agent's code), exactly what those sectors
must then hold, compares the rest byte for byte, and checks the new backup at the device's end.
Peers that copy bytes (bmaptool, dd) are compared byte for byte.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from benchlib.system import drop_caches, same_prefix

SECTOR = 512
BLOCK = 4 << 20
SIGNATURE = b"EFI PART"


def check_written(image: Path, device: str, size: int, *, gpt_fixed: bool) -> tuple[bool, str]:
    """(ok, why not). gpt_fixed: the writer relocates a GPT backup for a larger device (sledge)."""
    with open(image, "rb") as f:
        head = f.read(2 * SECTOR)
    if not gpt_fixed or head[SECTOR : SECTOR + 8] != SIGNATURE:
        return same_prefix(image, device, size)
    fd = os.open(device, os.O_RDONLY)
    try:
        device_size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    plan = expected(head, image, size, device_size)
    if isinstance(plan, str):
        return False, plan
    overrides, tail = plan
    drop_caches()
    return _compare(image, device, size, overrides, tail)


def expected(
    head: bytes, image: Path, size: int, device_size: int
) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]] | str:
    """What the device must hold where it may differ from the image: overrides inside the first
    `size` bytes, and the relocated backup past them. A message when the image's GPT is unusable."""
    hdr = head[SECTOR : 2 * SECTOR]
    (hsize,) = struct.unpack_from("<I", hdr, 12)
    (alt,) = struct.unpack_from("<Q", hdr, 32)
    entries_lba, count, entry_size = struct.unpack_from("<QII", hdr, 72)
    array_sectors = -(-count * entry_size // SECTOR)
    if not 92 <= hsize <= SECTOR or entry_size == 0 or array_sectors > 1024:
        return f"{image}: GPT header size {hsize}, entries {count} x {entry_size}: not one to check"
    new_alt = device_size // SECTOR - 1
    if new_alt == alt:
        return [], []  # the device is the image's disk size: the writer changes nothing
    if new_alt < alt:
        return f"{image}: its GPT needs {(alt + 1) * SECTOR} bytes, the device has {device_size}"
    with open(image, "rb") as f:
        f.seek(entries_lba * SECTOR)
        entries = f.read(count * entry_size)
    primary = bytearray(hdr)
    struct.pack_into("<Q", primary, 32, new_alt)
    struct.pack_into("<Q", primary, 48, new_alt - array_sectors - 1)
    _seal(primary, hsize)
    backup = bytearray(primary)
    struct.pack_into("<QQ", backup, 24, new_alt, 1)
    struct.pack_into("<Q", backup, 72, new_alt - array_sectors)
    _seal(backup, hsize)
    mbr = bytearray(head[:SECTOR])
    kinds = [mbr[446 + 16 * i + 4] for i in range(4)]
    if kinds.count(0xEE) == 1 and sum(1 for k in kinds if k) == 1:
        entry = 446 + 16 * kinds.index(0xEE)
        struct.pack_into("<I", mbr, entry + 12, min(new_alt, 0xFFFFFFFF))
    overrides = [(0, bytes(mbr)), (SECTOR, bytes(primary))]
    if (alt + 1) * SECTOR <= size:
        overrides.append((alt * SECTOR, bytes(SECTOR)))  # the old backup header, cleared
    array = entries + bytes(array_sectors * SECTOR - len(entries))
    tail = [((new_alt - array_sectors) * SECTOR, array), (new_alt * SECTOR, bytes(backup))]
    return overrides, tail


def _seal(header: bytearray, size: int) -> None:
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:size])))


def _compare(
    image: Path, device: str, size: int, overrides: list[tuple[int, bytes]], tail: list[tuple[int, bytes]]
) -> tuple[bool, str]:
    with open(image, "rb") as img, open(device, "rb") as dev:
        for offset in range(0, size, BLOCK):
            want = bytearray(img.read(min(BLOCK, size - offset)))
            for at, data in overrides:
                lo, hi = max(at, offset), min(at + len(data), offset + len(want))
                if lo < hi:
                    want[lo - offset : hi - offset] = data[lo - at : hi - at]
            got = dev.read(len(want))
            if got != want:
                first = offset + next(
                    (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(got)
                )
                return False, f"{device} differs from {image} (GPT edits allowed for) at byte offset {first}"
        for at, data in tail:
            dev.seek(at)
            if dev.read(len(data)) != data:
                return False, f"{device}: no backup GPT mirroring the image's primary at byte {at}"
    return True, ""
