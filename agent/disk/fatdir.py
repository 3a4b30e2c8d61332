"""Reading directories of a FAT12/16/32 filesystem (an image's EFI system partition), read-only.

Only what the agent needs to decide about UEFI boot entries: does a path exist, what does a
directory hold. Short (8.3) names only: FAT lookups are case-insensitive and firmware accepts
the short name of any file, so \\EFI\\DEBIAN\\GRUBX64.EFI names the same file as
\\EFI\\debian\\grubx64.efi. The bytes are untrusted (they come from an image): every offset, cluster
number and chain length is checked, and a damaged filesystem is an error, never a traceback.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from agent.disk.errors import DiskError

Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes, relative to the partition
MAX_DIR_BYTES = 1 << 20  # a directory bigger than this is not an ESP's
ATTR_DIR = 0x10
ATTR_VOLUME = 0x08
ATTR_LFN = 0x0F


class FatError(DiskError):
    """A FAT filesystem that cannot be read as one."""


@dataclass(frozen=True)
class Entry:
    name: str  # "GRUBX64.EFI", "DEBIAN"
    directory: bool
    cluster: int
    size: int


@dataclass(frozen=True)
class Fat:
    read: Reader
    size: int  # the partition's bytes
    sector: int
    cluster_sectors: int
    fat_offset: int
    bits: int  # 12, 16 or 32
    root_offset: int  # FAT12/16: the fixed root directory
    root_bytes: int
    root_cluster: int  # FAT32
    data_offset: int
    clusters: int

    @classmethod
    def open(cls, read: Reader, size: int) -> Fat:
        """The filesystem in the partition of `size` bytes that `read` reads (offsets relative to it)."""

        def bounded(offset: int, length: int) -> bytes:
            if offset < 0 or offset + length > size:
                raise FatError(f"FAT: {length} bytes at byte {offset} run past the partition's {size}")
            data = read(offset, length)
            if len(data) != length:
                raise FatError(f"FAT: short read, {len(data)} of {length} bytes at byte {offset}")
            return data

        return cls._parse(bounded, size)

    @classmethod
    def _parse(cls, read: Reader, size: int) -> Fat:
        boot = read(0, 512)
        if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
            raise FatError("no FAT boot sector: expected the signature 55aa at byte 510")
        bps, spc, reserved, nfats, root_entries, total16 = struct.unpack_from("<HBHBHH", boot, 11)
        fat16, total32, fat32, root_cluster = (
            struct.unpack_from("<H", boot, 22)[0],
            *struct.unpack_from("<I", boot, 32),
            *struct.unpack_from("<I", boot, 36),
            *struct.unpack_from("<I", boot, 44),
        )
        if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or nfats == 0 or reserved == 0:
            raise FatError(
                f"FAT boot sector: {bps} bytes per sector, {spc} per cluster, {nfats} FATs, "
                f"{reserved} reserved: expected 512-4096, a power of two, at least 1, at least 1"
            )
        fat_sectors = fat16 or fat32
        total = total16 or total32
        root_sectors = -(-root_entries * 32 // bps)
        data = reserved + nfats * fat_sectors + root_sectors
        if fat_sectors == 0 or total * bps > size or data >= total:
            raise FatError(
                f"FAT layout: {total} sectors of {bps} bytes, data from sector {data}: "
                f"expected them inside the partition's {size} bytes"
            )
        clusters = (total - data) // spc
        bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        return cls(
            read, size, bps, spc, reserved * bps, bits, (reserved + nfats * fat_sectors) * bps,
            root_sectors * bps, root_cluster, data * bps, clusters,
        )  # fmt: skip

    def _next(self, cluster: int) -> int:
        if self.bits == 32:
            return int(struct.unpack("<I", self.read(self.fat_offset + 4 * cluster, 4))[0]) & 0x0FFFFFFF
        if self.bits == 16:
            return int(struct.unpack("<H", self.read(self.fat_offset + 2 * cluster, 2))[0])
        pair = struct.unpack("<H", self.read(self.fat_offset + cluster * 3 // 2, 2))[0]
        return int(pair >> 4 if cluster & 1 else pair & 0xFFF)

    def _chain(self, first: int) -> bytes:
        """A directory's bytes, following its clusters; bounded and loop-safe."""
        end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]
        size = self.cluster_sectors * self.sector
        out = bytearray()
        cluster = first
        while cluster < end:
            if not 2 <= cluster < self.clusters + 2:
                raise FatError(f"FAT chain: cluster {cluster} outside 2..{self.clusters + 1}")
            if len(out) + size > MAX_DIR_BYTES:
                raise FatError(f"FAT directory longer than {MAX_DIR_BYTES} bytes (or a cluster loop)")
            out += self.read(self.data_offset + (cluster - 2) * size, size)
            cluster = self._next(cluster)
        return bytes(out)

    def listdir(self, path: str) -> list[Entry]:
        """The entries of the directory at path ("/", "EFI/BOOT"; any case, / or \\)."""
        if self.bits == 32:
            raw = self._chain(self.root_cluster)
        else:
            raw = self.read(self.root_offset, min(self.root_bytes, MAX_DIR_BYTES))
        for part in [p for p in path.replace("\\", "/").split("/") if p]:
            found = next((e for e in _entries(raw) if e.name.upper() == part.upper()), None)
            if found is None or not found.directory:
                raise FatError(f"FAT: no directory {part!r} in {path!r}")
            if found.cluster == 0:  # ".." to the root
                return self.listdir("/")
            raw = self._chain(found.cluster)
        return list(_entries(raw))

    def exists(self, path: str) -> bool:
        parts = [p for p in path.replace("\\", "/").split("/") if p]
        if not parts:
            return True
        try:
            entries = self.listdir("/".join(parts[:-1]))
        except FatError:
            return False
        return any(e.name.upper() == parts[-1].upper() and not e.directory for e in entries)


def _entries(raw: bytes) -> list[Entry]:
    out = []
    for off in range(0, len(raw) - 31, 32):
        first = raw[off]
        if first == 0:
            break
        attr = raw[off + 11]
        if first == 0xE5 or attr & ATTR_LFN == ATTR_LFN or attr & ATTR_VOLUME:
            continue
        name = bytes([0xE5 if first == 0x05 else first]) + raw[off + 1 : off + 8]
        base = name.decode("latin-1").rstrip()
        ext = raw[off + 8 : off + 11].decode("latin-1").rstrip()
        if base in (".", ".."):
            continue
        hi, lo, size = struct.unpack_from("<H", raw, off + 20)[0], *struct.unpack_from("<HI", raw, off + 26)
        out.append(Entry(f"{base}.{ext}" if ext else base, bool(attr & ATTR_DIR), hi << 16 | lo, size))
    return out
