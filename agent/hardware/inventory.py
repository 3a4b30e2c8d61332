"""The hardware inventory: collect() reads this machine (or a recorded tree) into typed values.

inventory = collect()                          # this machine
inventory = collect(Roots(sysfs=tree / "sys", proc=tree / "proc", dev=tree / "dev"),
                    RecordedProbes.load(tree / "probes.json").probes())
wire = inventory.to_wire(); Inventory.from_wire(wire) == inventory
"""

from __future__ import annotations

from agent.hardware.disks import collect_disks
from agent.hardware.model import (
    WIRE_VERSION,
    Address,
    Cpu,
    Dimm,
    Disk,
    Inventory,
    Memory,
    Nic,
    Partition,
    PciDevice,
    System,
)
from agent.hardware.net import collect_nics, collect_pci
from agent.hardware.probes import Probes, real_probes
from agent.hardware.system import collect_cpu, collect_memory, collect_system
from agent.hardware.tree import Observer, Roots, Tree

__all__ = [
    "Address",
    "Cpu",
    "Dimm",
    "Disk",
    "Inventory",
    "Memory",
    "Nic",
    "Partition",
    "PciDevice",
    "Roots",
    "System",
    "collect",
]


def collect(
    roots: Roots | None = None, probes: Probes | None = None, observer: Observer | None = None
) -> Inventory:
    roots = roots or Roots()
    probes = probes or real_probes()
    sys, proc, dev = (Tree(r, observer) for r in (roots.sysfs, roots.proc, roots.dev))
    return Inventory(
        version=WIRE_VERSION,
        system=collect_system(sys, proc),
        cpu=collect_cpu(sys, proc),
        memory=collect_memory(sys, proc),
        disks=collect_disks(sys, proc, dev, probes.udev),
        nics=collect_nics(sys, probes),
        pci_devices=collect_pci(sys),
        bmc_address=probes.bmc_address(),
    )
