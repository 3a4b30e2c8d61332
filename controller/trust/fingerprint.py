"""A machine's hardware fingerprint, bound at its first registration, and what changed since.

Made of what a machine carries and a stranger on the network does not see: the DMI system UUID,
the serials and WWNs of its fixed disks, and the permanent MACs of its physical NICs. Removable
disks (a USB stick left in) and disks with neither serial nor WWN (nothing stable to bind) are
left out. The agent reports it, so it is a claim, not a proof: it stops an impostor that knows a
MAC, not one that has also read the victim's serials (docs/trust.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.codec import _str_item
from agent.hardware.model import Inventory
from agent.protocol import Fields, identity


@dataclass(frozen=True, order=True)
class DiskId:
    serial: str
    wwn: str

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in (("serial", self.serial), ("wwn", self.wwn)) if v)


@dataclass(frozen=True)
class Fingerprint:
    system_uuid: str
    disks: tuple[DiskId, ...]  # sorted
    macs: tuple[str, ...]  # sorted

    def to_wire(self) -> dict[str, Any]:
        return {
            "system_uuid": self.system_uuid,
            "disks": [{"serial": d.serial, "wwn": d.wwn} for d in self.disks],
            "macs": list(self.macs),
        }

    @classmethod
    def from_wire(cls, obj: object, where: str = "fingerprint") -> Fingerprint:
        f = Fields(obj, where, ("system_uuid", "disks", "macs"))

        def disk(item: object, at: str) -> DiskId:
            d = Fields(item, at, ("serial", "wwn"))
            return DiskId(d.text("serial", "", max_len=256), d.text("wwn", "", max_len=256))

        return cls(
            f.text("system_uuid", "", max_len=64),
            tuple(sorted(f.items("disks", 1024, disk, ()))),
            tuple(sorted(f.items("macs", 1024, _str_item, ()))),
        )

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
