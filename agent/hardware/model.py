"""The inventory as typed values: what the agent reports and what disk selection reads.

Sizes are integers in bytes; a field the machine does not expose is None (or an
empty tuple), never a guess. docs/inventory.md describes every field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.hardware.wire import WireError, from_wire, to_wire

WIRE_VERSION = 1


@dataclass(frozen=True, slots=True)
class System:
    vendor: str | None
    product: str | None
    serial: str | None
    uuid: str | None  # DMI system UUID
    firmware_vendor: str | None
    firmware_version: str | None
    firmware_date: str | None
    boot_mode: str  # "uefi" or "bios"
    secure_boot: bool | None  # None: not visible (BIOS boot, or efivars unreadable)
    hostname: str | None


@dataclass(frozen=True, slots=True)
class Cpu:
    model: str | None
    arch: str
    sockets: int
    cores: int  # physical cores, all sockets
    threads: int  # logical CPUs online
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Dimm:
    locator: str | None
    size: int  # bytes; 0 for an empty slot is not listed
    type: str | None
    speed_mts: int | None
    manufacturer: str | None
    serial: str | None
    part_number: str | None


@dataclass(frozen=True, slots=True)
class Memory:
    total: int  # bytes the kernel manages (MemTotal)
    physical: int | None  # bytes of online memory blocks, closer to what is installed
    dimms: tuple[Dimm, ...]


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    number: int | None
    start: int  # bytes from the start of the disk
    size: int
    holders: tuple[str, ...]
    mounts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Disk:
    name: str  # kernel name, "sda"; the device node is path
    path: str
    kind: str  # disk, loop, ram, zram, rom, dm, md
    size: int
    model: str | None
    vendor: str | None
    serial: str | None
    wwn: str | None
    wwn_with_extension: str | None
    wwn_vendor_extension: str | None
    rotational: bool
    removable: bool
    read_only: bool
    logical_sector_size: int
    physical_sector_size: int
    tran: str | None  # as lsblk TRAN: sata, sas, nvme, usb, virtio, mmc, iscsi, fc, ...
    hctl: str | None
    by_path: tuple[str, ...]
    by_id: tuple[str, ...]
    partitions: tuple[Partition, ...]
    holders: tuple[str, ...]
    # every mount point on the disk, its partitions and (recursively) their holders;
    # "[SWAP]" for active swap, as lsblk shows it
    mounts: tuple[str, ...]
    holds_root: bool  # "/" lives on this disk (the running system)


@dataclass(frozen=True, slots=True)
class Address:
    family: str  # "inet" or "inet6"
    address: str
    prefixlen: int | None


@dataclass(frozen=True, slots=True)
class Nic:
    name: str
    mac: str | None
    permanent_mac: str | None
    driver: str | None
    pci_address: str | None
    speed_mbps: int | None  # None when the link is down or the driver does not say
    carrier: bool | None
    mtu: int | None
    physical: bool  # backed by a device (not a bridge, bond, veth, ...)
    addresses: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class PciDevice:
    address: str
    vendor_id: str
    device_id: str
    class_id: str
    subsystem_vendor_id: str | None
    subsystem_device_id: str | None
    driver: str | None


@dataclass(frozen=True, slots=True)
class Inventory:
    version: int
    system: System
    cpu: Cpu
    memory: Memory
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]
    pci_devices: tuple[PciDevice, ...]
    bmc_address: str | None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = to_wire(self)
        return wire

    @classmethod
    def from_wire(cls, data: object) -> Inventory:
        inventory = from_wire(cls, data, "inventory")
        if inventory.version != WIRE_VERSION:
            raise WireError("inventory.version", str(WIRE_VERSION), inventory.version)
        return inventory

    def disk(self, name: str) -> Disk:
        for d in self.disks:
            if name in (d.name, d.path):
                return d
        raise KeyError(f"no disk {name!r} in the inventory; have {[d.name for d in self.disks]}")
