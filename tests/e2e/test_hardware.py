"""The live image on the QEMU devices that stand in for a rack's hardware (issue 17).

One machine carries them all, so that one TCG boot (~30-70 s here) covers every family: NICs e1000,
e1000e, vmxnet3 and rtl8139 besides virtio; disks behind AHCI, an LSI MegaRAID SAS (megasas), an
LSI 53c895a SCSI HBA, NVMe, USB storage and virtio; a USB keyboard. Only the virtio NIC is cabled
(it PXE-boots the machine) and it comes after an uncabled rtl8139 on the PCI bus: the machine must
register all the same, without waiting out DHCP on the dead port. It PXE-boots the live image from a
real controller; each test then checks one family in the inventory the agent registered with.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from lab import Controller, Vm, build_live_image  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.qemu]
BOOT = 300.0  # seconds for a boot under TCG on a busy 2-core machine
MAC = "52:54:00:17:00:01"  # the cabled virtio NIC (Vm's own)
MiB = 1 << 20

# NICs without a cable (link down from power-on), before the cabled one on the PCI bus.
UNCABLED = {
    "rtl8139": ("52:54:00:17:01:39", {"8139cp", "8139too"}),
    "e1000": ("52:54:00:17:10:00", {"e1000"}),
    "e1000e": ("52:54:00:17:10:0e", {"e1000e"}),
    "vmxnet3": ("52:54:00:17:00:03", {"vmxnet3"}),
}
# Disks: serial -> (transport the agent reports as lsblk would: a MegaRAID logical drive has none,
# QEMU devices for it). {drive} is the -drive id.
DISKS: dict[str, tuple[str | None, list[str]]] = {
    "S17-AHCI": ("sata", ["ahci,id=ahci0", "ide-hd,bus=ahci0.0"]),
    "S17-MEGASAS": (None, ["megasas,id=sas0", "scsi-hd,bus=sas0.0"]),
    "S17-LSI": ("spi", ["lsi53c895a,id=spi0", "scsi-hd,bus=spi0.0"]),
    "S17-NVME": ("nvme", ["nvme"]),
    "S17-USB": ("usb", ["usb-storage,bus=xhci0.0"]),
}  # the last device of each holds the disk
# PCI drivers the image must bind: QEMU device -> kernel driver (as sysfs names it).
PCI_DRIVERS = {
    "ahci": "ahci",
    "megasas": "megaraid_sas",
    "lsi53c895a": "sym53c8xx",
    "nvme": "nvme",
    "qemu-xhci": "xhci_hcd",
}


@dataclass
class Booted:
    vm: Vm
    inventory: dict[str, Any]
    console: str


def machine_argv(vm: Vm, work: Path) -> list[str]:
    """Vm's argv (virtio NIC + virtio disk, PXE) with the stand-in devices added, paused at power-on."""
    argv = list(vm.argv)
    nics: list[str] = []
    for model, (mac, _) in UNCABLED.items():
        netdev = f"dead{model}"
        nics += [
            "-netdev",
            f"user,id={netdev},restrict=on",
            "-device",
            f"{model},netdev={netdev},mac={mac},romfile=",
        ]
    first_netdev = argv.index("-netdev")
    argv[first_netdev:first_netdev] = nics  # lower PCI slots than the cabled NIC
    argv += ["-S", "-device", "qemu-xhci,id=xhci0", "-device", "usb-kbd,bus=xhci0.0"]
    for n, (serial, (_, devices)) in enumerate(DISKS.items()):
        image = work / f"{serial.lower()}.img"
        with open(image, "wb") as f:
            f.truncate(disk_size(serial))
        # ids of our own: the Vm's boot disk is d0
        argv += ["-drive", f"file={image},if=none,id=hw{n},format=raw,cache=unsafe"]
        *controllers, disk = devices
        for device in [*controllers, f"{disk},drive=hw{n},serial={serial}"]:
            argv += ["-device", device]
    return argv


def disk_size(serial: str) -> int:
    """Each disk has its own size, so that it is found also where it reports no serial."""
    return (16 + sorted(DISKS).index(serial)) * MiB


def monitor(vm: Vm, commands: list[str]) -> None:
    """HMP commands once QEMU's monitor socket is up (QEMU was started paused with -S)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(vm.monitor))
                for command in commands:
                    s.sendall(command.encode() + b"\n")
                    time.sleep(0.2)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    need("qemu-system-x86_64", "socat", "mmdebstrap")
    work = tmp_path_factory.mktemp("hardware")
    kernel, initrd = build_live_image()
    controller = Controller(work / "data")
    controller.install_boot_files(kernel, initrd)
    controller.start()
    (work / "vm").mkdir()
    vm = Vm(work / "vm", controller.port, MAC, disk_size=32 * MiB)
    vm.argv = machine_argv(vm, work)
    try:
        vm.start()
        links = [f"set_link dead{model} off" for model in UNCABLED]
        monitor(vm, [*links, "cont"])
        started = time.monotonic()
        vm.wait_for(r"sledge-agent: registered as machine", BOOT)
        print(f"\nregistered {time.monotonic() - started:.1f} s after power-on")
        status, detail = controller.call("GET", f"/v1/machines/{MAC}")
        assert status == 200, detail
        yield Booted(vm, detail["inventory"], "\n".join(vm.lines))
    finally:
        vm.stop()
        controller.stop()
        log = work / "vm" / "console.log"
        if log.exists():
            print(f"--- {log} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-40:]))


def nics_by_mac(inventory: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(nic["mac"]).lower(): nic for nic in inventory["nics"] if nic.get("mac")}


@pytest.mark.parametrize("model", sorted(UNCABLED))
def test_every_nic_is_in_the_inventory_with_its_driver(booted: Booted, model: str) -> None:
    mac, drivers = UNCABLED[model]
    nics = nics_by_mac(booted.inventory)
    assert mac in nics, f"{model} NIC {mac}: not in the inventory (NICs: {sorted(nics)})"
    nic = nics[mac]
    assert nic["driver"] in drivers, (
        f"{model} NIC {mac}: driver {nic['driver']!r}, expected one of {sorted(drivers)}"
    )
    assert nic["carrier"] is not True, f"{model} NIC {mac}: carrier {nic['carrier']!r}, expected no cable"


def test_the_second_nic_is_the_cabled_one_and_the_machine_registered(booted: Booted) -> None:
    nics = nics_by_mac(booted.inventory)
    assert MAC in nics, f"cabled NIC {MAC}: not in the inventory (NICs: {sorted(nics)})"
    cabled = nics[MAC]
    assert cabled["driver"] == "virtio_net" and cabled["carrier"] is True, cabled
    assert any(a["address"].startswith("10.0.2.") for a in cabled["addresses"]), cabled["addresses"]
    rtl = nics[UNCABLED["rtl8139"][0]]
    assert rtl["pci_address"] < cabled["pci_address"], (rtl["pci_address"], cabled["pci_address"])


@pytest.mark.parametrize("serial", sorted(DISKS))
def test_every_disk_is_in_the_inventory(booted: Booted, serial: str) -> None:
    tran, _ = DISKS[serial]
    size = disk_size(serial)
    disks = {d["size"]: d for d in booted.inventory["disks"] if d["kind"] == "disk"}
    assert size in disks, f"disk {serial} of {size} bytes: not in the inventory (sizes: {sorted(disks)})"
    disk = disks[size]
    assert disk["tran"] == tran, f"disk {serial}: transport {disk['tran']!r}, expected {tran!r}"
    # QEMU's usb-storage gives its disk no SCSI serial (its serial= names the USB device).
    expected = None if tran == "usb" else serial
    assert disk["serial"] == expected, f"disk {serial}: serial {disk['serial']!r}, expected {expected!r}"


@pytest.mark.parametrize("device", sorted(PCI_DRIVERS))
def test_every_controller_is_bound_to_its_driver(booted: Booted, device: str) -> None:
    bound = {d["driver"] for d in booted.inventory["pci_devices"] if d.get("driver")}
    assert PCI_DRIVERS[device] in bound, (
        f"QEMU {device}: driver {PCI_DRIVERS[device]} not bound (bound: {sorted(bound)})"
    )


def test_the_usb_keyboard_is_an_input_device(booted: Booted) -> None:
    modules = re.search(r"sledge-init: .* modules: (.*)", booted.console)
    inputs = re.search(r"sledge-init: .* input: (.*)", booted.console)
    assert modules and inputs, "/init logged no modules or input line"
    loaded = set(modules.group(1).split())
    assert {"usbhid", "xhci_pci"} <= loaded, f"loaded modules: {sorted(loaded)}"
    assert "USB Keyboard" in inputs.group(1), f"input devices: {inputs.group(1)!r}"
