"""Per-instance configuration: a cloud-init NoCloud seed written as a `cidata` partition.

After a deploy has written the image, the seed (user-data, meta-data and, if given,
network-config) goes into a small FAT filesystem labelled CIDATA, in a partition at
the very end of the disk: growpart grows root only up to the next partition, so the
seed sits after all the free space. Deciding is pure (agent.disk: seedplan.plan_seed, vfat.build_fat);
this module reads the table, writes the bytes and reports.

SeedError                   a NoCloud seed cannot be written
├── TableError              no table, a damaged one, or no free entry (agent.disk.seedplan)
├── NoSpace                 too little free space at the end of the disk (agent.disk.seedplan)
├── SeedTooLarge            the files do not fit the seed filesystem (agent.disk.vfat)
└── DeviceError             the device cannot be opened, read or written (OS error, with the path)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime

from agent import blockdev
from agent.disk.errors import NoSpace, SeedError, SeedTooLarge, TableError
from agent.disk.seedplan import Geometry, Placement, TableType, plan_seed, seed_candidates
from agent.disk.tables import read_tables
from agent.disk.vfat import FatFile, build_fat, is_seed_fat
from agent.protocol import CloudInit

__all__ = [
    "SEED_SIZE",
    "DeviceError",
    "NoSpace",
    "SeedContent",
    "SeedError",
    "SeedFile",
    "SeedReport",
    "SeedTooLarge",
    "TableError",
    "TableType",
    "write_seed",
]

SEED_SIZE = 4 << 20
LABEL = "CIDATA"
BLKRRPART = 0x125F


class DeviceError(SeedError):
    pass


@dataclass(frozen=True)
class SeedContent:
    """The NoCloud files. network_config empty: no network-config file (cloud-init's default)."""

    user_data: str
    meta_data: str
    network_config: str = ""

    @classmethod
    def from_cloud_init(cls, cloud_init: CloudInit, instance_id: str, hostname: str = "") -> SeedContent:
        """The job's files; meta-data defaults to its instance-id (and local-hostname when known)."""
        meta = cloud_init.meta_data
        if not meta:
            # JSON strings are YAML scalars: quoting keeps odd ids and names intact.
            meta = f"instance-id: {json.dumps(instance_id)}\n"
            meta += f"local-hostname: {json.dumps(hostname)}\n" if hostname else ""
        return cls(cloud_init.user_data, meta, cloud_init.network_config)

    def files(self) -> list[FatFile]:
        out = [FatFile("user-data", self.user_data.encode()), FatFile("meta-data", self.meta_data.encode())]
        if self.network_config:
            out.append(FatFile("network-config", self.network_config.encode()))
        return out


@dataclass(frozen=True)
class SeedFile:
    name: str
    size: int


@dataclass(frozen=True)
class SeedReport:
    device: str
    table: TableType
    partition: int  # 1-based number
    start: int  # bytes
    size: int  # bytes
    files: tuple[SeedFile, ...]
    replaced: bool  # an earlier seed partition was reused

    def describe(self) -> str:
        names = ", ".join(f"{f.name} ({f.size} bytes)" for f in self.files)
        verb = "replaced" if self.replaced else "added"
        return (
            f"cloud-init seed {verb} on {self.device}: {self.table.value} partition {self.partition} "
            f"({LABEL}), {self.size} bytes at byte {self.start}: {names}"
        )


def plan_device(fd: int, path: str, seed_size: int, guid_seed: bytes | None) -> tuple[Geometry, Placement]:
    """Read the tables of an open device (carefully) and plan the seed partition (writes nothing)."""
    geometry = Geometry(blockdev.size_of(fd), blockdev.logical_sector_size(fd))
    tables = read_tables(lambda offset, length: os.pread(fd, length, offset), geometry.size, geometry.sector)
    proven = frozenset(
        c.number
        for c in seed_candidates(tables)
        if c.start < geometry.sectors
        and is_seed_fat(
            os.pread(fd, 512, c.start * geometry.sector), geometry.sector, c.start, c.sectors, LABEL
        )
    )
    placement = plan_seed(tables, seed_size, disk=path, guid_seed=guid_seed, proven=proven)
    return geometry, placement


def _open(path: str) -> int:
    try:
        st = os.stat(path)
        # O_EXCL on a block device: the kernel refuses while it is mounted or held.
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if stat.S_ISBLK(st.st_mode) else 0)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise DeviceError(f"{path}: expected a block device or a regular file")
        return os.open(path, flags)
    except OSError as exc:
        detail = "busy (mounted or held open)" if exc.errno == errno.EBUSY else exc.strerror
        raise DeviceError(f"{path}: cannot open for writing: {detail}") from None


def write_seed(
    device_path: str,
    seed: SeedContent,
    *,
    seed_size: int = SEED_SIZE,
    guid_seed: bytes | None = None,
    now: datetime | None = None,
) -> SeedReport:
    """Write the seed filesystem and its partition to a deployed disk (or an image file); fsync.

    Nothing is written when the plan is refused (TableError, NoSpace, SeedTooLarge).
    guid_seed makes the partition GUID and volume serial deterministic (tests).
    """
    fd = _open(device_path)
    try:
        geometry, placement = plan_device(fd, device_path, seed_size, guid_seed)
        volume_id = int.from_bytes(os.urandom(4) if guid_seed is None else guid_seed.ljust(4, b"\0")[:4])
        files = seed.files()
        image = build_fat(
            files,
            placement.size,
            when=now or datetime.now(UTC),
            sector=geometry.sector,
            label=LABEL,
            volume_id=volume_id,
            hidden_sectors=placement.start // geometry.sector,
        )
        # The filesystem first, into space no partition claims yet; the table last.
        # Whatever follows the FAT in the partition (alignment slack) is zeroed too.
        os.pwrite(fd, image.ljust(placement.size, b"\0"), placement.start)
        for offset, data in placement.writes:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
        if blockdev.is_block_device(fd):
            # Partitions in use, or a kernel that does not parse tables: the deployed system reads it at boot.
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, BLKRRPART)
    except OSError as exc:
        raise DeviceError(f"{device_path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return SeedReport(
        device_path,
        placement.table,
        placement.number,
        placement.start,
        placement.size,
        tuple(SeedFile(f.name, len(f.data)) for f in files),
        placement.replaced,
    )
