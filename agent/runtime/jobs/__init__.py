"""The jobs an operator can give an agent. Each is a function (JobContext) -> Outcome.

They decide and report; the machine's I/O (inventory, devices, power) comes
through the injected Machine, so the job loop runs in tests with a fake one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent import protocol as p
from agent.hardware.model import Disk, Inventory
from agent.runtime.config import AgentConfig


class Machine(Protocol):
    def inventory(self) -> Inventory: ...

    def power(self, action: p.PowerAction) -> None: ...


Emit = Callable[[p.EventKind, str, "int | None", "int | None"], None]


@dataclass
class JobContext:
    assignment: p.Assignment
    config: AgentConfig
    machine: Machine
    emit: Emit
    cancel: threading.Event
    post_inventory: Callable[[Inventory], None]

    def stage(self, message: str) -> None:
        self.emit(p.EventKind.STAGE, message, None, None)

    def log(self, message: str) -> None:
        self.emit(p.EventKind.LOG, message, None, None)

    def warn(self, message: str) -> None:
        self.emit(p.EventKind.WARNING, message, None, None)

    def progress(self, message: str, done: int, total: int) -> None:
        self.emit(p.EventKind.PROGRESS, message, done, total)

    def sources(self) -> tuple[str, ...]:
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
