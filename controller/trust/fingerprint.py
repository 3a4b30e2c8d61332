"""A machine's hardware fingerprint, bound at its first registration, and what changed since.

Made of what a machine carries and a stranger on the network does not see: the DMI system UUID,
the serials and WWNs of its fixed disks, and the permanent MACs of its physical NICs. Removable
disks (a USB stick left in) and disks with neither serial nor WWN (nothing stable to bind) are
left out. The agent reports it, so it is a claim, not a proof: it stops an impostor that knows a
MAC, not one that has also read the victim's serials (docs/trust.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from agent.hardware.model import Inventory
from agent.protocol import identity
from agent.wire import Bound, Message

Text = Annotated[str, Bound(max_len=256)]


@dataclass(frozen=True, order=True)
class DiskId(Message):
    serial: Text = ""
    wwn: Text = ""

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in (("serial", self.serial), ("wwn", self.wwn)) if v)


@dataclass(frozen=True)
class Fingerprint(Message):
    """Kept sorted (`fingerprint()` builds it so), so two of the same hardware compare equal."""

    WIRE_WHERE: ClassVar[str] = "fingerprint"
    system_uuid: Annotated[str, Bound(max_len=64)] = ""
    disks: Annotated[tuple[DiskId, ...], Bound(max_len=1024)] = ()
    macs: Annotated[tuple[str, ...], Bound(max_len=1024, item_len=64)] = ()

    def __str__(self) -> str:
        disks = ", ".join(str(d) for d in self.disks) or "none"
        return f"uuid {self.system_uuid or '-'}; disks {disks}; macs {', '.join(self.macs) or 'none'}"


def fingerprint(inventory: Inventory) -> Fingerprint:
    uuid, macs = identity(inventory)
    disks = {
        DiskId((d.serial or "").strip(), (d.wwn or "").strip().lower())
        for d in inventory.disks
        if d.kind == "disk" and not d.removable and ((d.serial or "").strip() or (d.wwn or "").strip())
    }
    return Fingerprint(uuid, tuple(sorted(disks)), tuple(sorted(macs)))


def changes(bound: Fingerprint, seen: Fingerprint) -> list[str]:
    """What differs, one phrase per change, e.g. 'disk serial=S1 removed' ([] if nothing)."""
    out = []
    if bound.system_uuid != seen.system_uuid:
        out.append(f"system uuid {bound.system_uuid or '-'} -> {seen.system_uuid or '-'}")
    out += [f"disk {d} removed" for d in bound.disks if d not in seen.disks]
    out += [f"disk {d} added" for d in seen.disks if d not in bound.disks]
    out += [f"mac {m} removed" for m in bound.macs if m not in seen.macs]
    out += [f"mac {m} added" for m in seen.macs if m not in bound.macs]
    return out
