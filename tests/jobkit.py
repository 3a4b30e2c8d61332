"""Jobs on fakes: disks in an inventory, backed by sparse files, and a job context around them."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from agent import protocol as p
from agent.hardware.model import Disk, Partition
from agent.runtime.config import AgentConfig
from agent.runtime.devices import DirectorySources, SparseDisks
from agent.runtime.jobs import JobContext
from agent.runtime.machine import FakeMachine
from tests.unit.test_controller_kit import inventory

GiB = 1 << 30


def fake_disk(
    name: str,
    size: int = 8 * GiB,
    serial: str = "",
    read_only: bool = False,
    partitions: tuple[Partition, ...] = (),
) -> Disk:
    """An internal virtio disk as the inventory would list it."""
    return Disk(
        name=name,
        path=f"/dev/{name}",
        kind="disk",
        size=size,
        model="QEMU HARDDISK",
        vendor=None,
        serial=serial or f"SERIAL-{name}",
        wwn=None,
        wwn_with_extension=None,
        wwn_vendor_extension=None,
        rotational=False,
        removable=False,
        read_only=read_only,
        logical_sector_size=512,
        physical_sector_size=512,
        tran="virtio",
        hctl=None,
        by_path=(),
        by_id=(),
        partitions=partitions,
        holders=(),
        mounts=(),
        holds_root=False,
    )


@dataclasses.dataclass
class Rig:
    """A job context on fakes, and what the job said."""

    ctx: JobContext
    disks: SparseDisks
    sources: DirectorySources
    lines: list[str]


def rig(
    tmp_path: Path,
    disks: list[Disk],
    kind: p.JobKind,
    params: p.JobParams,
    store: Path | None = None,
    pace: float = 0.0,
    efi: Path | None = None,
) -> Rig:
    fakes = SparseDisks(tmp_path / "disks", {d.path: d.size for d in disks}, pace=pace, efi=efi)
    sources = DirectorySources(store or tmp_path / "no-store")
    lines: list[str] = []
    machine = FakeMachine(dataclasses.replace(inventory(), disks=tuple(disks)))
    ctx = JobContext(
        p.Assignment("j-000000000001", kind, 1, 1, 60.0, params),
        AgentConfig(controller="http://c", workers=2),
        machine,
        sources,
        fakes,
        lambda kind, message, done, total: lines.append(f"{kind.value}: {message}"),
        threading.Event(),
        lambda inv: None,
    )
    return Rig(ctx, fakes, sources, lines)
