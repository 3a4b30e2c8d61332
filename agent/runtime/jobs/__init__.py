"""The jobs an operator can give an agent. Each is a function (JobContext) -> Outcome.

They decide and report; the machine's I/O comes through injected interfaces, each
with a fake beside the real one (agent.runtime.machine, agent.runtime.devices):
Machine (inventory, power), Sources (base URLs -> chunk sources) and Disks (device
path -> open target). So every job runs in tests with no server and no disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from agent import protocol as p
from agent.hardware.model import Disk, Inventory
from agent.runtime.config import AgentConfig

if TYPE_CHECKING:  # annotations only: the agent's start does not pay for the writer's imports
    from agent.runtime.seed import SeedContent, SeedReport
    from agent.writer.device import OpenTarget
    from agent.writer.sources import ChunkSource


@runtime_checkable
class Machine(Protocol):
    def inventory(self) -> Inventory: ...

    def power(self, action: p.PowerAction) -> None: ...


@runtime_checkable
class Sources(Protocol):
    def open(self, bases: Sequence[str]) -> list[ChunkSource]:
        """Chunk sources for the store base URLs, in order (the caller closes them)."""
        ...


@runtime_checkable
class Disks(Protocol):
    def open_write(self, path: str, image_size: int) -> OpenTarget:
        """The disk opened to be written (TargetError when it must not be, or is too small)."""
        ...

    def open_read(self, path: str) -> OpenTarget:
        """The disk opened only to be read (verify)."""
        ...

    def write_seed(self, path: str, content: SeedContent) -> SeedReport:
        """A cloud-init seed partition added to the deployed disk."""
        ...

    def boot_entry(self, path: str, description: str) -> str:
        """The UEFI boot entry the deployed disk needs, added if any; what was done ("" if nothing)."""
        ...


def check_io(machine: object, sources: object, disks: object) -> None:
    """At start, not mid-job: each injected piece has every method its interface names."""
    for name, value, kind in (
        ("machine", machine, Machine),
        ("sources", sources, Sources),
        ("disks", disks, Disks),
    ):
        if not isinstance(value, kind):
            raise TypeError(f"{name}: expected a {kind.__name__} implementation, got {type(value).__name__}")


Emit = Callable[[p.EventKind, str, "int | None", "int | None"], None]


@dataclass
class JobContext:
    assignment: p.Assignment
    config: AgentConfig
    machine: Machine
    sources: Sources
    disks: Disks
    emit: Emit
    cancel: threading.Event
    post_inventory: Callable[[Inventory], None]
    announce: Callable[[p.Announce], p.AnnounceReply] | None = None  # the tracker (peer sharing)

    def stage(self, message: str) -> None:
        self.emit(p.EventKind.STAGE, message, None, None)

    def log(self, message: str) -> None:
        self.emit(p.EventKind.LOG, message, None, None)

    def warn(self, message: str) -> None:
        self.emit(p.EventKind.WARNING, message, None, None)

    def progress(self, message: str, done: int, total: int) -> None:
        self.emit(p.EventKind.PROGRESS, message, done, total)

    def source_urls(self) -> tuple[str, ...]:
        if self.assignment.sources:
            return self.assignment.sources
        return (self.config.controller.rstrip("/") + p.STORE_PATH.rstrip("/"),)


@dataclass(frozen=True)
class Outcome:
    result: p.JobResult
    then: p.PowerAction | None = None  # done after the controller has the result


def failed(message: str, disk: str = "") -> Outcome:
    return Outcome(p.JobResult(p.Outcome.FAILED, message[:4000], disk))


def choose_disk(ctx: JobContext) -> Disk:
    """The disk the job's hints name (or the default choice); raises SelectionError/HintError."""
    from agent.hardware.hints import select_disk

    inventory = ctx.machine.inventory()
    hints = ctx.assignment.params.disk.as_dict() or None
    disk = select_disk(inventory.disks, hints)
    ctx.stage(f"disk {disk.path}: {disk.size} bytes, model {disk.model or '?'}, serial {disk.serial or '?'}")
    return disk
