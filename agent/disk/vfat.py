"""A minimal FAT12/FAT16 image with a few files in its root directory, built in memory.

Written in pure Python rather than with mkfs.vfat + mcopy: the agent runs from a
live image where every package costs boot time, the seed is a few small files
(no subdirectories, no fragmentation, nothing to update later), and building bytes
in memory needs no temporary file and is deterministic, so it is table-tested.
Files get VFAT long-name entries (cloud-init's NoCloud reads `network-config`,
which has no 8.3 form) beside generated ~1 short names. The FAT type follows the
cluster count as in Microsoft's spec and Linux (< 4085 clusters: FAT12).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.disk.errors import SeedError, SeedTooLarge

ROOT_ENTRIES = 512  # 16 KiB: a whole number of 512- and 4096-byte sectors
SECTORS_PER_TRACK, HEADS = 32, 64  # as mkfs.fat for small disks; size is kept a multiple of a track
MEDIA = 0xF8
_SHORT_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")


@dataclass(frozen=True)
class FatFile:
    name: str
    data: bytes


@dataclass(frozen=True)
class FatLayout:
    sector: int
    total: int  # sectors
    per_cluster: int
    fat_bits: int
    fat_sectors: int
    clusters: int

    @property
    def root_start(self) -> int:  # sectors
        return 1 + 2 * self.fat_sectors

    @property
    def data_start(self) -> int:
        return self.root_start + ROOT_ENTRIES * 32 // self.sector

    @property
    def cluster_bytes(self) -> int:
        return self.per_cluster * self.sector


def layout(size: int, sector: int = 512) -> FatLayout:
    """The FAT geometry for a `size`-byte filesystem (rounded down to whole tracks)."""
    total = size // sector // SECTORS_PER_TRACK * SECTORS_PER_TRACK
    per_cluster = 1
    while per_cluster * sector <= 32 << 10:
        for bits, lo, hi in ((12, 1, 4084), (16, 4085, 65524)):
            fat_sectors = 1
            for _ in range(8):  # the FAT's size and the cluster count depend on each other
                data = total - 1 - 2 * fat_sectors - ROOT_ENTRIES * 32 // sector
                clusters = data // per_cluster
                fat_sectors = -(-(clusters + 2) * bits // 8 // sector) or 1
            data = total - 1 - 2 * fat_sectors - ROOT_ENTRIES * 32 // sector
            clusters = data // per_cluster
            if lo <= clusters <= hi and (clusters + 2) * bits <= fat_sectors * sector * 8:
                return FatLayout(sector, total, per_cluster, bits, fat_sectors, clusters)
        per_cluster *= 2
    raise SeedError(f"FAT image of {size} bytes with {sector}-byte sectors: no FAT12/FAT16 geometry fits")


def _dos_time(when: datetime) -> tuple[int, int]:
    when = max(when, datetime(1980, 1, 1, tzinfo=when.tzinfo))
    date = (when.year - 1980) << 9 | when.month << 5 | when.day
    return date, when.hour << 11 | when.minute << 5 | when.second // 2


def _short_names(names: Sequence[str]) -> list[bytes]:
    out: list[bytes] = []
    for name in names:
        stem, _, ext = name.upper().rpartition(".") if "." in name[1:] else (name.upper(), "", "")
        stem = "".join(c for c in stem if c in _SHORT_OK) or "FILE"
        ext = "".join(c for c in ext if c in _SHORT_OK)[:3]
        n = 1
        while (short := (f"{stem[: 7 - len(str(n))]}~{n}".ljust(8) + ext.ljust(3)).encode()) in out:
            n += 1
        out.append(short)
    return out


def _checksum(short: bytes) -> int:
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _long_entries(name: str, short: bytes) -> bytes:
    chars = name.encode("utf-16-le")
    chars += b"\0\0" if len(chars) % 26 else b""
    chars += b"\xff" * (-len(chars) % 26)
    parts = [chars[i : i + 26] for i in range(0, len(chars), 26)]
    out = b""
    for seq in range(len(parts), 0, -1):  # stored last part first
        p = parts[seq - 1]
        order = seq | (0x40 if seq == len(parts) else 0)
        out += bytes([order]) + p[:10] + bytes([0x0F, 0, _checksum(short)]) + p[10:22] + b"\0\0" + p[22:26]
    return out


def _dir_entry(short: bytes, attr: int, when: datetime, cluster: int = 0, size: int = 0) -> bytes:
    date, time = _dos_time(when)
    return short + struct.pack("<BBBHHHHHHHI", attr, 0, 0, time, date, date, 0, time, date, cluster, size)


def _set_fat(fat: bytearray, bits: int, n: int, value: int) -> None:
    if bits == 16:
        struct.pack_into("<H", fat, 2 * n, value & 0xFFFF)
        return
    off = n * 3 // 2
    (word,) = struct.unpack_from("<H", fat, off)
    word = (word & 0x000F) | (value << 4) if n % 2 else (word & 0xF000) | value
    struct.pack_into("<H", fat, off, word & 0xFFFF)


def _boot_sector(lay: FatLayout, label: bytes, volume_id: int, hidden: int) -> bytes:
    small = lay.total if lay.total < 1 << 16 else 0
    bpb = struct.pack(
        "<3s8sHBHBHHBHHHII",
        b"\xeb\x3c\x90",
        b"MSWIN4.1",
        lay.sector,
        lay.per_cluster,
        1,
        2,
        ROOT_ENTRIES,
        small,
        MEDIA,
        lay.fat_sectors,
        SECTORS_PER_TRACK,
        HEADS,
        hidden,
        0 if small else lay.total,
    )
    ebpb = struct.pack("<BBBI11s8s", 0x80, 0, 0x29, volume_id, label, f"FAT{lay.fat_bits}".ljust(8).encode())
    boot = bpb + ebpb
    return boot.ljust(510, b"\0") + b"\x55\xaa" + bytes(lay.sector - 512)


def build_fat(
    files: Sequence[FatFile],
    size: int,
    *,
    when: datetime,
    sector: int = 512,
    label: str = "CIDATA",
    volume_id: int = 0,
    hidden_sectors: int = 0,
) -> bytes:
    """A whole FAT image (size rounded down to whole tracks) holding `files` in its root directory."""
    lay = layout(size, sector)
    label_bytes = label.upper().encode("ascii")[:11].ljust(11)
    need = sum(-(-len(f.data) // lay.cluster_bytes) for f in files)
    if need > lay.clusters:
        total = sum(len(f.data) for f in files)
        raise SeedTooLarge(
            f"seed files: {total} bytes ({need} clusters of {lay.cluster_bytes}) do not fit "
            f"a {lay.total * sector}-byte FAT with {lay.clusters} clusters"
        )
    fat = bytearray(lay.fat_sectors * sector)
    _set_fat(fat, lay.fat_bits, 0, (0xFF00 | MEDIA) & ((1 << lay.fat_bits) - 1))
    _set_fat(fat, lay.fat_bits, 1, (1 << lay.fat_bits) - 1)
    root = bytearray(_dir_entry(label_bytes, 0x08, when))
    data = bytearray()
    cluster = 2
    for f, short in zip(files, _short_names([f.name for f in files]), strict=True):
        count = -(-len(f.data) // lay.cluster_bytes)
        for n in range(cluster, cluster + count):
            _set_fat(fat, lay.fat_bits, n, n + 1 if n < cluster + count - 1 else (1 << lay.fat_bits) - 1)
        root += _long_entries(f.name, short)
        root += _dir_entry(short, 0x20, when, cluster if count else 0, len(f.data))
        data += f.data.ljust(count * lay.cluster_bytes, b"\0")
        cluster += count
    if len(root) > ROOT_ENTRIES * 32:
        raise SeedTooLarge(f"seed files: {len(root) // 32} root directory entries, at most {ROOT_ENTRIES}")
    image = bytearray(lay.total * sector)
    image[:sector] = _boot_sector(lay, label_bytes, volume_id, hidden_sectors)
    for off, part in (
        (sector, fat),
        ((1 + lay.fat_sectors) * sector, fat),
        (lay.root_start * sector, root),
        (lay.data_start * sector, data),
    ):
        image[off : off + len(part)] = part
    return bytes(image)


def volume_label(boot_sector: bytes) -> str | None:
    """The label in a FAT boot sector (FAT12/16 or FAT32), or None if it is not one."""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        return None
    fat32 = struct.unpack_from("<H", boot_sector, 22)[0] == 0
    off = 71 if fat32 else 43
    if boot_sector[off - 5] != 0x29:  # extended boot signature: the label field exists
        return None
    return boot_sector[off : off + 11].decode("ascii", "replace").rstrip()


def is_seed_fat(
    boot_sector: bytes, sector: int, start_lba: int, part_sectors: int, label: str = "CIDATA"
) -> bool:
    """Whether a partition's first sector is a FAT that build_fat made for that very partition.

    A name or a type is what any tenant can write; this asks for the whole of sledge's boot
    sector (geometry constants, label, FAT12/16, hidden sectors = the partition's start, a size
    that fits it), so an ext4 or a stranger's FAT in a partition named cidata is never replaced.
    """
    if len(boot_sector) < 512 or volume_label(boot_sector) != label.upper():
        return False
    f = struct.unpack_from("<3s8sHBHBHHBHHHII", boot_sector)
    jump, _, bps, per_cluster, reserved, fats, roots, small, media, fat_sectors, spt, heads, hidden, large = f
    total = small or large
    return (
        jump == b"\xeb\x3c\x90"
        and bps == sector
        and per_cluster in {1, 2, 4, 8, 16, 32, 64}
        and (reserved, fats, roots, media, spt, heads)
        == (1, 2, ROOT_ENTRIES, MEDIA, SECTORS_PER_TRACK, HEADS)
        and fat_sectors > 0
        and hidden == start_lba
        and 0 < total <= part_sectors
        and boot_sector[54:62] in (b"FAT12   ", b"FAT16   ")
    )
