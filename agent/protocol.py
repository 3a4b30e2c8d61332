"""The agent <-> controller protocol: typed messages, strict decoding, one codec.

Every message is a frozen dataclass with `to_wire()` (plain JSON/msgpack types)
and `from_wire(obj)`, which refuses unknown fields, wrong types and out-of-range
values with a ProtocolError naming the field, the expectation and what was found.
Bodies travel as JSON or msgpack (`decode_body` / `encode_body`, chosen by the
Content-Type). docs/controller.md lists the endpoints; the paths are below.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.codec import _MISSING, _str_item
from agent.codec import JSON as JSON
from agent.codec import MAX_BODY as MAX_BODY
from agent.codec import MSGPACK as MSGPACK
from agent.codec import Fields as Fields
from agent.codec import ProtocolError as ProtocolError
from agent.codec import decode_body as decode_body
from agent.codec import encode_body as encode_body
from agent.codec import media_type as media_type
from agent.codec import normalize_mac as normalize_mac
from agent.hardware.model import Inventory
from agent.hardware.wire import WireError

REGISTER_PATH = "/v1/agent/register"
HEARTBEAT_PATH = "/v1/agent/heartbeat"
INVENTORY_PATH = "/v1/agent/inventory"  # POST an Inventory (agent.hardware.model) as the body
NEXT_JOB_PATH = "/v1/agent/jobs/next"  # GET ?wait=SECONDS; 204 when there is no job
BOOT_SCRIPT_PATH = "/boot/ipxe"  # GET ?mac=MAC: the iPXE script, with a fresh enrollment token
STORE_PATH = "/v1/store/"  # + agent.image.layout.chunk_path / manifest_path
MAX_EVENTS_PER_POST = 1000
_ID = re.compile(r"[a-z]-[0-9a-f]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def job_events_path(job_id: str) -> str:
    return f"/v1/agent/jobs/{job_id}/events"


def job_finish_path(job_id: str) -> str:
    return f"/v1/agent/jobs/{job_id}/finish"


# -- inventory and disk hints ------------------------------------------------------------------------


def read_inventory(obj: object, where: str = "inventory") -> Inventory:
    """The hardware inventory (agent.hardware.model), with its wire errors as ProtocolError."""
    try:
        inventory = Inventory.from_wire(obj)
    except WireError as exc:
        raise ProtocolError(exc.where.replace("inventory", where, 1), exc.expected, exc.actual) from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            where, "an inventory as agent.hardware.model.Inventory writes it", str(exc)
        ) from None
    identity(inventory)
    return inventory


def identity(inventory: Inventory) -> tuple[str, tuple[str, ...]]:
    """(DMI system UUID or "", MAC addresses of the physical NICs) — how a machine is recognised."""
    nics = [n for n in inventory.nics if n.physical] or list(inventory.nics)
    macs = []
    for i, nic in enumerate(nics):
        mac = nic.permanent_mac or nic.mac
        if mac:
            macs.append(normalize_mac(mac, f"inventory.nics[{i}].mac"))
    if not macs:
        raise ProtocolError("inventory.nics", "at least one network interface with a MAC address", [])
    return (inventory.system.uuid or "").lower(), tuple(dict.fromkeys(macs))


DISK_HINT_KEYS = (
    "by_path",
    "hctl",
    "model",
    "name",
    "rotational",
    "serial",
    "size",
    "vendor",
    "wwn",
    "wwn_vendor_extension",
    "wwn_with_extension",
)


@dataclass(frozen=True)
class DiskHints:
    """Ironic-style root device hints, name -> value (values may carry operators: '>= 100')."""

    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, hints: Mapping[str, str]) -> DiskHints:
        return cls.from_wire(dict(hints))

    def as_dict(self) -> dict[str, str]:
        return dict(self.items)

    def to_wire(self) -> dict[str, str]:
        return dict(self.items)

    @classmethod
    def from_wire(cls, obj: object, where: str = "disk") -> DiskHints:
        f = Fields(obj, where, DISK_HINT_KEYS)
        return cls(tuple(sorted((k, f.text(k, max_len=256)) for k in f.obj)))

    @classmethod
    def parse(cls, text: str) -> DiskHints:
        """'serial=ABC,size=>= 100' (the CLI's form)."""
        pairs: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ProtocolError("disk", "KEY=VALUE pairs separated by commas", part)
            pairs[key.strip()] = value.strip()
        return cls.from_wire(pairs)


# -- jobs ----------------------------------------------------------------------------------------------


class JobKind(enum.StrEnum):
    DEPLOY = "deploy"
    ERASE = "erase"
    VERIFY = "verify"
    INVENTORY = "inventory"
    REBOOT = "reboot"


class EraseMode(enum.StrEnum):
    METADATA = "metadata"  # filesystem/RAID signatures and both GPT copies
    FULL = "full"  # every byte: discard where it guarantees zeroes, else BLKZEROOUT


class PowerAction(enum.StrEnum):
    REBOOT = "reboot"
    POWEROFF = "poweroff"


MAX_SEED_TEXT = 64 << 10


@dataclass(frozen=True)
class CloudInit:
    """A NoCloud seed for the deployed system; empty means none is written."""

    user_data: str = ""
    meta_data: str = ""
    network_config: str = ""

    def __bool__(self) -> bool:
        return bool(self.user_data or self.meta_data or self.network_config)

    def to_wire(self) -> dict[str, str]:
        return dict(self.__dict__)

    @classmethod
    def from_wire(cls, obj: object, where: str = "cloud_init") -> CloudInit:
        f = Fields(obj, where, tuple(cls.__dataclass_fields__))
        return cls(
            f.text("user_data", "", max_len=MAX_SEED_TEXT),
            f.text("meta_data", "", max_len=MAX_SEED_TEXT),
            f.text("network_config", "", max_len=MAX_SEED_TEXT),
        )


@dataclass(frozen=True)
class JobParams:
    """Parameters of any job kind; which ones matter depends on the kind (validate_for checks)."""

    image_name: str = ""
    image_version: str = ""
    manifest_digest: str = ""
    disk: DiskHints = field(default_factory=DiskHints)
    erase_mode: EraseMode = EraseMode.METADATA
    power: PowerAction = PowerAction.REBOOT
    cloud_init: CloudInit = field(default_factory=CloudInit)

    def to_wire(self) -> dict[str, Any]:
        wire = dict(self.__dict__)
        wire["disk"] = self.disk.to_wire()
        wire["cloud_init"] = self.cloud_init.to_wire()
        wire["erase_mode"] = self.erase_mode.value
        wire["power"] = self.power.value
        return wire

    @classmethod
    def from_wire(cls, obj: object, where: str = "params") -> JobParams:
        f = Fields(obj, where, tuple(cls.__dataclass_fields__))
        digest = f.text("manifest_digest", "", max_len=64)
        if digest and not _HEX64.fullmatch(digest):
            raise ProtocolError(f.path("manifest_digest"), "64 lowercase hex characters", digest)
        return cls(
            image_name=f.text("image_name", "", max_len=128),
            image_version=f.text("image_version", "", max_len=128),
            manifest_digest=digest,
            disk=DiskHints.from_wire(f.obj.get("disk", {}), f.path("disk")),
            erase_mode=f.choice("erase_mode", EraseMode, EraseMode.METADATA),
            power=f.choice("power", PowerAction, PowerAction.REBOOT),
            cloud_init=CloudInit.from_wire(f.obj.get("cloud_init", {}), f.path("cloud_init")),
        )

    def validate_for(self, kind: JobKind) -> None:
        if kind in (JobKind.DEPLOY, JobKind.VERIFY) and not self.manifest_digest:
            raise ProtocolError("params.manifest_digest", f"a manifest digest for a {kind} job", "")


@dataclass(frozen=True)
class Assignment:
    """A job handed to an agent. Events continue from next_seq; sources are chunk store base URLs."""

    job_id: str
    kind: JobKind
    attempt: int
    next_seq: int
    lease_seconds: float
    params: JobParams
    sources: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind.value,
            "attempt": self.attempt,
            "next_seq": self.next_seq,
            "lease_seconds": self.lease_seconds,
            "params": self.params.to_wire(),
            "sources": list(self.sources),
        }

    @classmethod
    def from_wire(cls, obj: object, where: str = "") -> Assignment:
        f = Fields(obj, where, tuple(cls.__dataclass_fields__))
        return cls(
            f.text("job_id", pattern=_ID),
            f.choice("kind", JobKind),
            f.integer("attempt", 1, 1 << 31),
            f.integer("next_seq", 1, 1 << 62),
            f.number("lease_seconds", 0.0, 86400.0),
            JobParams.from_wire(f.obj.get("params", {}), f.path("params")),
            f.items("sources", 16, _str_item, ()),
        )


# -- events and results -------------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    STAGE = "stage"
    PROGRESS = "progress"
    LOG = "log"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Event:
    """One agent event; seq numbers a job's events from 1 with no gaps."""

    seq: int
    at: float
    kind: EventKind
    message: str = ""
    done: int | None = None
    total: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind.value,
            "message": self.message,
        }
        if self.done is not None:
            wire["done"] = self.done
        if self.total is not None:
            wire["total"] = self.total
        return wire

    @classmethod
    def from_wire(cls, obj: object, where: str = "event") -> Event:
        f = Fields(obj, where, tuple(cls.__dataclass_fields__))
        return cls(
            f.integer("seq", 1, 1 << 62),
            f.number("at", 0.0, 1e11),
            f.choice("kind", EventKind),
            f.text("message", "", max_len=4096),
            f.integer("done", 0, 1 << 62, None),
            f.integer("total", 0, 1 << 62, None),
        )


@dataclass(frozen=True)
class EventBatch:
    attempt: int
    events: tuple[Event, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "events": [e.to_wire() for e in self.events]}

    @classmethod
    def from_wire(cls, obj: object, where: str = "") -> EventBatch:
        f = Fields(obj, where, ("attempt", "events"))
        events = f.items("events", MAX_EVENTS_PER_POST, Event.from_wire)
        for i in range(1, len(events)):
            if events[i].seq != events[i - 1].seq + 1:
                raise ProtocolError(
                    f"events[{i}].seq", f"{events[i - 1].seq + 1} (consecutive)", events[i].seq
                )
        return cls(f.integer("attempt", 1, 1 << 31), events)


@dataclass(frozen=True)
class EventAck:
    next_seq: int

    def to_wire(self) -> dict[str, Any]:
        return {"next_seq": self.next_seq}

    @classmethod
    def from_wire(cls, obj: object) -> EventAck:
        return cls(Fields(obj, "", ("next_seq",)).integer("next_seq", 1, 1 << 62))


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobResult:
    outcome: Outcome
    message: str = ""
    disk: str = ""
    bytes_written: int = 0
    bytes_fetched: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {**self.__dict__, "outcome": self.outcome.value}

    @classmethod
    def from_wire(cls, obj: object, where: str = "result") -> JobResult:
        f = Fields(obj, where, tuple(cls.__dataclass_fields__))
        return cls(
            f.choice("outcome", Outcome),
            f.text("message", "", max_len=4096),
            f.text("disk", "", max_len=256),
            f.integer("bytes_written", 0, 1 << 62, 0),
            f.integer("bytes_fetched", 0, 1 << 62, 0),
        )


@dataclass(frozen=True)
class FinishRequest:
    attempt: int
    result: JobResult

    def to_wire(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "result": self.result.to_wire()}

    @classmethod
    def from_wire(cls, obj: object, where: str = "") -> FinishRequest:
        f = Fields(obj, where, ("attempt", "result"))
        return cls(
            f.integer("attempt", 1, 1 << 31),
            JobResult.from_wire(f._get("result", _MISSING), f.path("result")),
        )


# -- registration and heartbeat ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterRequest:
    enrollment_token: str
    inventory: Inventory
    agent_version: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "enrollment_token": self.enrollment_token,
            "inventory": self.inventory.to_wire(),
            "agent_version": self.agent_version,
        }

    @classmethod
    def from_wire(cls, obj: object, where: str = "") -> RegisterRequest:
        f = Fields(obj, where, tuple(cls.__dataclass_fields__))
        return cls(
            f.text("enrollment_token", max_len=200),
            read_inventory(f._get("inventory", _MISSING), f.path("inventory")),
            f.text("agent_version", "", max_len=64),
        )


@dataclass(frozen=True)
class RegisterReply:
    machine_id: str
    agent_token: str
    heartbeat_seconds: float
    poll_seconds: float

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_wire(cls, obj: object) -> RegisterReply:
        f = Fields(obj, "", tuple(cls.__dataclass_fields__))
        return cls(
            f.text("machine_id", pattern=_ID),
            f.text("agent_token", max_len=200),
            f.number("heartbeat_seconds", 0.0, 3600.0),
            f.number("poll_seconds", 0.0, 3600.0),
        )


@dataclass(frozen=True)
class Heartbeat:
    job_id: str | None = None
    status: str = ""

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_wire(cls, obj: object, where: str = "") -> Heartbeat:
        f = Fields(obj, where, ("job_id", "status"))
        job_id = f.obj.get("job_id")
        if job_id is not None:
            job_id = f.text("job_id", pattern=_ID)
        return cls(job_id, f.text("status", "", max_len=256))


@dataclass(frozen=True)
class HeartbeatReply:
    """cancel: jobs of this machine the agent must stop (cancelled by an operator, or lease lost)."""

    cancel: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"cancel": list(self.cancel)}

    @classmethod
    def from_wire(cls, obj: object) -> HeartbeatReply:
        return cls(Fields(obj, "", ("cancel",)).items("cancel", 64, _str_item, ()))
