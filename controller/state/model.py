"""What the controller remembers: typed records, one per table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from agent.hardware.model import Inventory
from agent.protocol import DiskHints, EventKind, JobKind, JobParams, JobResult
from controller.jobs import JobState, JobStatus, MachineState


@dataclass(frozen=True)
class Machine:
    id: str
    state: MachineState
    macs: tuple[str, ...]
    system_uuid: str = ""
    hostname: str = ""
    desired_image: str = ""
    disk_hints: DiskHints = field(default_factory=DiskHints)
    created_at: float = 0.0
    last_seen: float | None = None
    inventory: Inventory | None = None

    @property
    def label(self) -> str:
        return f"machine {self.id}" + (f" ({self.hostname})" if self.hostname else "")


@dataclass(frozen=True)
class InventoryRecord:
    machine_id: str
    at: float
    inventory: Inventory


@dataclass(frozen=True)
class Image:
    name: str
    version: str
    digest: str
    image_size: int
    data_size: int
    chunks: int
    registered_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Job:
    id: str
    machine_id: str
    kind: JobKind
    params: JobParams
    status: JobStatus
    created_at: float
    updated_at: float
    result: JobResult | None = None
    done: int | None = None
    total: int | None = None

    @property
    def state(self) -> JobState:
        return self.status.state


class Source(enum.StrEnum):
    AGENT = "agent"
    CONTROLLER = "controller"


@dataclass(frozen=True)
class EventRecord:
    """An event as stored: agent events carry the agent's seq; controller events have none."""

    id: int
    job_id: str
    machine_id: str
    seq: int | None
    at: float
    source: Source
    kind: EventKind
    message: str
    done: int | None = None
    total: int | None = None


class TokenKind(enum.StrEnum):
    ENROLLMENT = "enrollment"
    AGENT = "agent"


@dataclass(frozen=True)
class Token:
    """A credential as stored: only the sha256 of its secret."""

    id: str
    kind: TokenKind
    secret_hash: bytes
    created_at: float
    machine_id: str | None = None
    mac: str | None = None
    expires_at: float | None = None
    used_at: float | None = None


@dataclass(frozen=True)
class Counts:
    machines: dict[MachineState, int]
    jobs: dict[JobState, int]
