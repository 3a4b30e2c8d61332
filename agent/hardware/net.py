"""Network interfaces and PCI devices from sysfs; addresses and permanent MACs from probes."""

from __future__ import annotations

import re

from agent.hardware.model import Nic, PciDevice
from agent.hardware.probes import Probes
from agent.hardware.tree import Tree

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def collect_nics(sys: Tree, probes: Probes) -> tuple[Nic, ...]:
    addresses = probes.addresses()
    nics = []
    for name in sys.list("class/net"):
        base = f"class/net/{name}"
        if name == "lo" or sys.int(f"{base}/type") == 772:  # ARPHRD_LOOPBACK
            continue
        physical = sys.exists(f"{base}/device")
        # the PCI function is the nearest PCI address up the device path (virtio NICs sit below it)
        path = sys.resolve(f"{base}/device") if physical else None
        pci = [c for c in (path or "").split("/") if _PCI_ADDRESS.match(c)]
        speed = sys.int(f"{base}/speed")  # EINVAL while down; -1 when unknown
        mac = sys.text(f"{base}/address")
        nics.append(
            Nic(
                name=name,
                mac=mac,
                permanent_mac=probes.permanent_mac(name) if physical else None,
                driver=sys.link_name(f"{base}/device/driver") if physical else None,
                pci_address=pci[-1] if pci else None,
                speed_mbps=speed if speed is not None and speed > 0 else None,
                carrier=sys.flag(f"{base}/carrier"),
                mtu=sys.int(f"{base}/mtu"),
                physical=physical,
                addresses=tuple(addresses.get(name, ())),
            )
        )
    return tuple(nics)


def collect_pci(sys: Tree) -> tuple[PciDevice, ...]:
    devices = []
    for address in sys.list("bus/pci/devices"):
        base = f"bus/pci/devices/{address}"
        devices.append(
            PciDevice(
                address=address,
                vendor_id=sys.text(f"{base}/vendor") or "",
                device_id=sys.text(f"{base}/device") or "",
                class_id=sys.text(f"{base}/class") or "",
                subsystem_vendor_id=sys.text(f"{base}/subsystem_vendor"),
                subsystem_device_id=sys.text(f"{base}/subsystem_device"),
                driver=sys.link_name(f"{base}/driver"),
            )
        )
    return tuple(devices)
