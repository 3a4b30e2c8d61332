"""The operator API's messages, declared once (agent.wire): the bodies it reads, the views it
writes. The handlers, the OpenAPI document and the operator CLI (which decodes the views it
is sent) all use these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Self

from agent.hardware.model import Inventory
from agent.protocol import DiskHints, EventKind, JobKind, JobParams, JobResult, ProtocolError, read_inventory
from agent.wire import Bound, Message, path
from controller.boot import cmdline
from controller.jobs import JobState, MachineState
from controller.state.model import (
    BmcRecord,
    EventRecord,
    Image,
    InventoryRecord,
    Job,
    Machine,
    PowerState,
    Quarantine,
    Source,
)
from controller.trust.fingerprint import Fingerprint, changes

Ref = Annotated[str, Bound(max_len=257)]  # NAME[:VERSION], a machine id, MAC or hostname


# -- bodies the operator API reads -----------------------------------------------------------------


@dataclass(frozen=True)
class MachinePatch(Message):
    """Absent fields are left as they are."""

    desired_image: Ref | None = None
    disk_hints: DiskHints | None = None
    # appended to the machine's agent boot ("" clears them), e.g. "sledge.shell=1"
    kernel_args: (
        Annotated[str, Bound(max_len=cmdline.MAX_LEN, pattern=cmdline.PATTERN, expected=cmdline.EXPECTED)]
        | None
    ) = None

    def wire_check(self, where: str) -> None:
        word = cmdline.reserved_key(self.kernel_args or "")
        if word is not None:
            raise ProtocolError(
                path(where, "kernel_args"), "arguments the controller does not set itself", word
            )


@dataclass(frozen=True)
class BmcSet(Message):
    """A machine's BMC (docs/power.md). The password is sealed at once and never shown again."""

    address: Annotated[
        str, Bound(max_len=512)
    ]  # redfish://HOST[:PORT]/redfish/v1/Systems/ID | ipmi://HOST[:PORT]
    username: Annotated[str, Bound(max_len=64)]
    password: Annotated[str, Bound(max_len=256)] = field(repr=False)


@dataclass(frozen=True)
class PowerRequest(Message):
    action: Annotated[str, Bound(max_len=16)]  # on, off, cycle, status


@dataclass(frozen=True)
class ImageRegister(Message):
    ref: Ref


@dataclass(frozen=True)
class JobCreate(Message):
    machine: Ref
    kind: JobKind
    image: Ref = ""
    params: JobParams = field(default_factory=JobParams)


# -- views it writes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorReply(Message):
    error: str
    status: int
    field: Annotated[str | None, Bound(omit_none=True)] = None


@dataclass(frozen=True)
class Health(Message):
    ok: bool


@dataclass(frozen=True)
class JobStateReply(Message):
    job_id: str
    state: JobState


@dataclass(frozen=True)
class Deleted(Message):
    deleted: str


@dataclass(frozen=True)
class MachineView(Message):
    id: str
    state: MachineState
    hostname: str
    macs: tuple[str, ...]
    system_uuid: str
    desired_image: str
    disk_hints: DiskHints
    created_at: float
    last_seen: float | None
    expected: bool  # may enroll once while discovery is closed (`sledge machine expect`)
    power: PowerState | None  # as last polled through its BMC; None: the machine has no BMC record
    kernel_args: str  # its own, appended to the agent boot's kernel command line

    @classmethod
    def of(cls, m: Machine, bmc: BmcRecord | None = None) -> MachineView:
        return MachineView(
            m.id,
            m.state,
            m.hostname,
            m.macs,
            m.system_uuid,
            m.desired_image,
            m.disk_hints,
            m.created_at,
            m.last_seen,
            m.expected,
            bmc.power if bmc else None,
            m.kernel_args,
        )


@dataclass(frozen=True)
class BmcView(Message):
    """A BMC record as shown: never its password (not even sealed)."""

    machine_id: str
    address: str
    username: str
    power: PowerState
    power_at: float | None
    power_error: str

    @classmethod
    def of(cls, b: BmcRecord) -> Self:
        return cls(b.machine_id, b.address, b.username, b.power, b.power_at, b.power_error)


@dataclass(frozen=True)
class QuarantineView(Message):
    """What the operator decides on: the registration's fingerprint, and exactly what changed."""

    at: float
    address: str
    previous_state: MachineState
    fingerprint: Fingerprint
    changes: tuple[str, ...]

    @classmethod
    def of(cls, q: Quarantine, bound: Fingerprint | None) -> Self:
        found = tuple(changes(bound, q.fingerprint)) if bound else ()
        return cls(q.at, q.address, q.previous_state, q.fingerprint, found)


@dataclass(frozen=True)
class InventoryAt(Message):
    at: float

    @classmethod
    def of(cls, r: InventoryRecord) -> Self:
        return cls(r.at)


@dataclass(frozen=True)
class ImageView(Message):
    name: str
    version: str
    digest: str
    image_size: int
    data_size: int
    chunks: int
    registered_at: float

    @classmethod
    def of(cls, i: Image) -> Self:
        return cls(i.name, i.version, i.digest, i.image_size, i.data_size, i.chunks, i.registered_at)


@dataclass(frozen=True)
class JobView(Message):
    id: str
    machine_id: str
    kind: JobKind
    params: JobParams
    state: JobState
    attempts: int
    max_attempts: int
    lease_deadline: float | None
    reason: str
    result: JobResult | None
    done: int | None
    total: int | None
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, j: Job) -> JobView:
        s = j.status
        return JobView(
            j.id, j.machine_id, j.kind, shown_params(j.params), s.state, s.attempts, s.max_attempts,
            s.lease_deadline, s.reason, j.result, j.done, j.total, j.created_at, j.updated_at,
        )  # fmt: skip


def shown_params(p: JobParams) -> JobParams:
    """Job parameters with the cloud-init seed's contents left out: user-data carries SSH keys,
    passwords and join tokens, and this view ends up in terminals, scripts and their logs. Only
    the machine's trusted agent receives them (in its Assignment)."""
    if not p.cloud_init:
        return p
    ci = p.cloud_init
    hidden = [
        f"<{len(v.encode())} bytes, not shown>" if v else ""
        for v in (ci.user_data, ci.meta_data, ci.network_config)
    ]
    return replace(
        p, cloud_init=replace(ci, user_data=hidden[0], meta_data=hidden[1], network_config=hidden[2])
    )


@dataclass(frozen=True)
class EventView(Message):
    id: int
    job_id: str | None  # None: an event of the machine itself (a quarantine)
    machine_id: str
    seq: int | None
    at: float
    source: Source
    kind: EventKind
    message: str
    done: int | None
    total: int | None

    @classmethod
    def of(cls, e: EventRecord) -> Self:
        return cls(e.id, e.job_id, e.machine_id, e.seq, e.at, e.source, e.kind, e.message, e.done, e.total)


def _inventory(v: object, where: str) -> Inventory | None:
    return None if v is None else read_inventory(v, where)


@dataclass(frozen=True)
class MachineDetail(MachineView):
    inventory: Annotated[Inventory | None, Bound(read=_inventory)]
    jobs: tuple[JobView, ...]
    inventory_history: tuple[InventoryAt, ...]
    fingerprint: Fingerprint | None  # bound at the first registration
    quarantine: QuarantineView | None
    events: tuple[EventView, ...]  # the machine's own events (quarantine, accept, BMC)
    bmc: BmcView | None
    # The BMC address the agent found (ipmitool lan print): shown as a suggestion only, never
    # used until an operator sets it with `sledge machine bmc`.
    bmc_suggested: str | None


@dataclass(frozen=True)
class JobDetail(JobView):
    events: tuple[EventView, ...]


@dataclass(frozen=True)
class MachineList(Message):
    machines: tuple[MachineView, ...]


@dataclass(frozen=True)
class ImageList(Message):
    images: tuple[ImageView, ...]


@dataclass(frozen=True)
class JobList(Message):
    jobs: tuple[JobView, ...]


@dataclass(frozen=True)
class EventList(Message):
    events: tuple[EventView, ...]
