"""The agent <-> controller protocol: typed messages, strict decoding, one codec.

Every message is declared once, as a frozen dataclass whose field types carry their
bounds (agent.wire): `to_wire()` (plain JSON/msgpack types), `from_wire(obj)` (refuses
unknown fields, wrong types and out-of-range values with a ProtocolError naming the
field, the expectation and what was found) and the OpenAPI schema come from it.
Bodies travel as JSON or msgpack (`decode_body` / `encode_body`, chosen by the
Content-Type). docs/controller.md lists the endpoints; the paths are below.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from agent.codec import JSON as JSON
from agent.codec import MAX_BODY as MAX_BODY
from agent.codec import MSGPACK as MSGPACK
from agent.codec import ProtocolError as ProtocolError
from agent.codec import decode_body as decode_body
from agent.codec import encode_body as encode_body
from agent.codec import media_type as media_type
from agent.codec import normalize_mac as normalize_mac
from agent.hardware.hints import HINT_NAMES
from agent.hardware.model import Inventory
from agent.hardware.wire import WireError
from agent.wire import Bound, Message, path, reader, schema_of

REGISTER_PATH = "/v1/agent/register"
HEARTBEAT_PATH = "/v1/agent/heartbeat"
INVENTORY_PATH = "/v1/agent/inventory"  # POST an Inventory (agent.hardware.model) as the body
NEXT_JOB_PATH = "/v1/agent/jobs/next"  # GET ?wait=SECONDS; 204 when there is no job
BOOT_SCRIPT_PATH = "/boot/ipxe"  # GET ?mac=MAC: the iPXE script, with a fresh enrollment token
STORE_PATH = "/v1/store/"  # + agent.image.layout.chunk_path / manifest_path
MAX_EVENTS_PER_POST = 1000


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


@dataclass(frozen=True)
class DiskHints:
    """Ironic-style root device hints, name -> value (values may carry operators: '>= 100').

    The names are the hint engine's (agent.hardware.hints.HINT_NAMES); the expressions are
    checked by that engine on the agent, against the disks it sees.
    """

    WIRE_WHERE: ClassVar[str] = "disk"
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
        if not isinstance(obj, dict):
            raise ProtocolError(where or "<body>", "an object", obj)
        for key in obj:
            if key not in HINT_NAMES:
                raise ProtocolError(
                    path(where, str(key)), f"one of the fields {', '.join(HINT_NAMES)}", "unknown"
                )
        return cls(tuple(sorted((k, _HINT_VALUE(v, path(where, k))) for k, v in obj.items())))

    @staticmethod
    def wire_schema() -> dict[str, Any]:
        value = schema_of(str, Bound(max_len=MAX_HINT_TEXT))
        return {
            "type": "object",
            "properties": {name: value for name in HINT_NAMES},
            "additionalProperties": False,
            "description": "root device hints (docs/root-device-hints.md)",
        }

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


MAX_HINT_TEXT = 256
_HINT_VALUE = reader(str, Bound(max_len=MAX_HINT_TEXT))

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
# the bounds the messages share
Id = Annotated[str, Bound(max_len=1024, pattern=r"[a-z]-[0-9a-f]{12}")]
Seq = Annotated[int, Bound(lo=1, hi=1 << 62)]
Attempt = Annotated[int, Bound(lo=1, hi=1 << 31)]
Count = Annotated[int, Bound(lo=0, hi=1 << 62)]
Text4k = Annotated[str, Bound(max_len=4096)]
Token = Annotated[str, Bound(max_len=200)]
Seconds = Annotated[float, Bound(lo=0.0, hi=3600.0)]
SeedText = Annotated[str, Bound(max_len=MAX_SEED_TEXT)]
ImageText = Annotated[str, Bound(max_len=128)]
Digest = Annotated[str, Bound(max_len=64, pattern="|[0-9a-f]{64}", expected="64 lowercase hex characters")]
Urls = Annotated[tuple[str, ...], Bound(max_len=16, item_len=2048)]


@dataclass(frozen=True)
class CloudInit(Message):
    """A NoCloud seed for the deployed system; empty means none is written."""

    WIRE_WHERE: ClassVar[str] = "cloud_init"
    user_data: SeedText = ""
    meta_data: SeedText = ""
    network_config: SeedText = ""

    def __bool__(self) -> bool:
        return bool(self.user_data or self.meta_data or self.network_config)


@dataclass(frozen=True)
class JobParams(Message):
    """Parameters of any job kind; which ones matter depends on the kind (validate_for checks)."""

    WIRE_WHERE: ClassVar[str] = "params"
    image_name: ImageText = ""
    image_version: ImageText = ""
    manifest_digest: Digest = ""
    disk: DiskHints = field(default_factory=DiskHints)
    erase_mode: EraseMode = EraseMode.METADATA
    power: PowerAction = PowerAction.REBOOT
    cloud_init: CloudInit = field(default_factory=CloudInit)

    def validate_for(self, kind: JobKind) -> None:
        if kind in (JobKind.DEPLOY, JobKind.VERIFY) and not self.manifest_digest:
            raise ProtocolError("params.manifest_digest", f"a manifest digest for a {kind} job", "")


@dataclass(frozen=True)
class Assignment(Message):
    """A job handed to an agent. Events continue from next_seq; sources are chunk store base URLs."""

    job_id: Id
    kind: JobKind
    attempt: Attempt
    next_seq: Seq
    lease_seconds: Annotated[float, Bound(lo=0.0, hi=86400.0)]
    params: JobParams = field(default_factory=JobParams)
    sources: Urls = ()


# -- events and results -------------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    STAGE = "stage"
    PROGRESS = "progress"
    LOG = "log"
    WARNING = "warning"
    ERROR = "error"


Progress = Annotated[int | None, Bound(lo=0, hi=1 << 62, omit_none=True)]


@dataclass(frozen=True)
class Event(Message):
    """One agent event; seq numbers a job's events from 1 with no gaps."""

    WIRE_WHERE: ClassVar[str] = "event"
    seq: Seq
    at: Annotated[float, Bound(lo=0.0, hi=1e11)]
    kind: EventKind
    message: Text4k = ""
    done: Progress = None
    total: Progress = None


@dataclass(frozen=True)
class EventBatch(Message):
    attempt: Attempt
    events: Annotated[tuple[Event, ...], Bound(max_len=MAX_EVENTS_PER_POST)]

    def wire_check(self, where: str) -> None:
        events = self.events
        for i in range(1, len(events)):
            if events[i].seq != events[i - 1].seq + 1:
                raise ProtocolError(
                    path(where, f"events[{i}].seq"), f"{events[i - 1].seq + 1} (consecutive)", events[i].seq
                )


@dataclass(frozen=True)
class EventAck(Message):
    next_seq: Seq


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobResult(Message):
    WIRE_WHERE: ClassVar[str] = "result"
    outcome: Outcome
    message: Text4k = ""
    disk: Annotated[str, Bound(max_len=256)] = ""
    bytes_written: Count = 0
    bytes_fetched: Count = 0


@dataclass(frozen=True)
class FinishRequest(Message):
    attempt: Attempt
    result: JobResult


# -- registration and heartbeat ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterRequest(Message):
    enrollment_token: Token
    inventory: Annotated[Inventory, Bound(read=read_inventory)]
    agent_version: Annotated[str, Bound(max_len=64)] = ""


@dataclass(frozen=True)
class RegisterReply(Message):
    machine_id: Id
    agent_token: Token
    heartbeat_seconds: Seconds
    poll_seconds: Seconds


@dataclass(frozen=True)
class Heartbeat(Message):
    job_id: Annotated[str | None, Bound(max_len=1024, pattern=r"[a-z]-[0-9a-f]{12}")] = None
    status: Annotated[str, Bound(max_len=256)] = ""


@dataclass(frozen=True)
class HeartbeatReply(Message):
    """cancel: jobs of this machine the agent must stop (cancelled by an operator, or lease lost)."""

    cancel: Annotated[tuple[str, ...], Bound(max_len=64, item_len=2048)] = ()


# -- peers: the deploy job's announce to the tracker (docs/peers.md) ---------------------------------

PEERS_PATH = "/v1/agent/peers"
MAX_PEERS = 10
Bitmap = Annotated[str, Bound(max_len=11000, pattern="[A-Za-z0-9+/=]*", expected="base64")]
ChunkCount = Annotated[int, Bound(lo=0, hi=1 << 16)]
MAX_VOUCHES = 16  # peers vouched for in one announce


@dataclass(frozen=True)
class Served(Message):
    """A peer that served the announcing agent chunks that verified, and which (a have-bitmap)."""

    url: Annotated[str, Bound(max_len=128)]
    have: Bitmap = ""


@dataclass(frozen=True)
class Announce(Message):
    """A deploying agent says which chunks of its job's image it holds and where it serves them."""

    job_id: Id
    manifest_digest: Digest
    port: Annotated[int, Bound(lo=1, hi=65535)]
    chunks: ChunkCount  # chunks in the image (the bitmap's length in bits)
    have: Bitmap = ""
    complete: bool = False
    leaving: bool = False  # the job's sharing ends: the tracker forgets this agent at once
    # peers this agent dropped since its last announce because bytes they served failed the
    # manifest's digest (their urls as the tracker gave them): enough reports remove that peer
    bad: Urls = ()
    # the chunks that verified here, by the peer that served them, since the last announce: the
    # tracker counts a holding's claim to a chunk once another agent vouches for it
    # (controller.fleet.tracker)
    served: Annotated[tuple[Served, ...], Bound(max_len=MAX_VOUCHES)] = ()


@dataclass(frozen=True)
class PeerGrant(Message):
    """The image's fleet key for one epoch (and the next: agents hold it before that epoch starts),
    the issuing controller's key id, and the agent's own ticket under the first (agent.peer.ticket)."""

    epoch: Annotated[int, Bound(lo=0, hi=10**12 - 1)]
    key: Annotated[str, Bound(max_len=64, pattern="[0-9a-f]{64}", expected="64 lowercase hex characters")]
    ticket: Annotated[str, Bound(max_len=256)]
    expires: Annotated[float, Bound(lo=0.0, hi=1e12)]
    kid: Annotated[str, Bound(max_len=8, pattern="[0-9a-f]{8}", expected="8 lowercase hex characters")] = (
        "00000000"
    )
    next_key: Annotated[
        str, Bound(max_len=64, pattern="([0-9a-f]{64})?", expected="64 lowercase hex characters or none")
    ] = ""
    now: Annotated[float, Bound(lo=0.0, hi=1e12)] = 0.0  # the controller's clock (0: not said)


@dataclass(frozen=True)
class PeerInfo(Message):
    machine_id: Id
    url: Annotated[str, Bound(max_len=128)]
    have: Bitmap = ""
    complete: bool = False


@dataclass(frozen=True)
class AnnounceReply(Message):
    """Peers that hold chunks the agent lacks (completed first), the origin share the agent seeds
    (chunk i is its to fetch from the sources when i % seed_of == seed_slot), and when to ask again."""

    grant: PeerGrant
    peers: Annotated[tuple[PeerInfo, ...], Bound(max_len=MAX_PEERS)] = ()
    seed_slot: Annotated[int, Bound(lo=0, hi=10**6)] = 0
    seed_of: Annotated[int, Bound(lo=1, hi=10**6)] = 1
    interval: Seconds = 2.0
    swarm_have: Bitmap = ""  # every chunk someone in the swarm holds: paces the origin shares
    # peers the tracker removed from the swarm (several agents got bad bytes from them), newest
    # last: drop them, though another answer named them before
    shunned: Urls = ()
