"""What the controller remembers: typed records, one per table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from agent.hardware.model import Inventory
from agent.protocol import DiskHints, EventKind, JobKind, JobParams, JobResult
from controller.jobs import JobState, JobStatus, MachineState
from controller.trust.fingerprint import Fingerprint


@dataclass(frozen=True)
class Quarantine:
    """A registration whose hardware differs from the machine's bound fingerprint, held for an operator."""

    fingerprint: Fingerprint  # what the registration reported
    inventory: Inventory  # applied to the machine only if an operator accepts it
    previous_state: MachineState  # where `sledge machine accept` returns the machine
    at: float
    address: str  # where the registration came from

    def to_wire(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint.to_wire(),
            "inventory": self.inventory.to_wire(),
            "previous_state": self.previous_state.value,
            "at": self.at,
            "address": self.address,
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Quarantine:
        return cls(
            Fingerprint.from_wire(obj["fingerprint"]),
            Inventory.from_wire(obj["inventory"]),
            MachineState(obj["previous_state"]),
            float(obj["at"]),
            str(obj["address"]),
        )


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
    fingerprint: Fingerprint | None = None  # bound at the first registration
    quarantine: Quarantine | None = None  # set while state is quarantined
    expected: bool = False  # an operator's `machine expect`: may enroll once with discovery closed
    kernel_args: str = ""  # appended to its agent boot's kernel command line (controller.boot.cmdline)

    @property
    def label(self) -> str:
        return f"machine {self.id}" + (f" ({self.hostname})" if self.hostname else "")


class PowerState(enum.StrEnum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"  # never asked, or the BMC did not answer (power_error says why)


@dataclass(frozen=True)
class BmcRecord:
    """A machine's BMC: its address, the user, the password sealed (controller.power.vault), and
    the power state as last polled."""

    machine_id: str
    address: str  # redfish://HOST:PORT/redfish/v1/Systems/ID or ipmi://HOST:PORT (controller.power.address)
    username: str
    sealed_password: str = field(repr=False)
    power: PowerState = PowerState.UNKNOWN
    power_at: float | None = None  # when the BMC last answered about power (or failed to)
    power_error: str = ""  # the BMC's words when the last poll failed


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
    job_id: str | None  # None: an event of the machine itself (quarantine, accept)
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
    address: str | None = None  # enrollment: the address that fetched the boot script holding it


@dataclass(frozen=True)
class Counts:
    machines: dict[MachineState, int]
    jobs: dict[JobState, int]
