"""Inventory collection on recorded/hand-made sysfs trees (tests/fixtures/hardware/build.py
makes them), the wire codec, the small parsers, and once on this real machine."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from agent.hardware.disks import decode_udev, read_mounts, serial_from_vpd80, wwn_from_wwid
from agent.hardware.inventory import Disk, Inventory, Roots, collect
from agent.hardware.probes import RecordedProbes, parse_ipmitool_lan
from agent.hardware.system import parse_smbios_memory_device
from agent.hardware.tree import Tree
from agent.hardware.wire import WireError
from tests.trees import machine_trees

SHAPES = ("qemu-guest", "server", "usb-and-sd", "installed", "this-machine")
GiB = 1 << 30


def load(shape: str) -> Inventory:
    root = machine_trees() / shape
    roots = Roots(sysfs=root / "sys", proc=root / "proc", dev=root / "dev")
    return collect(roots, RecordedProbes.load(root / "probes.json").probes())


def disks(inv: Inventory) -> dict[str, Disk]:
    return {d.name: d for d in inv.disks}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_round_trips_through_json(shape: str) -> None:
    inv = load(shape)
    wire = json.loads(json.dumps(inv.to_wire()))
    assert Inventory.from_wire(wire) == inv
    assert inv.cpu.threads >= 1 and inv.memory.total > 0


def test_qemu_guest_virtio_disk_and_nic_without_udev() -> None:
    inv = load("qemu-guest")
    assert inv.system.vendor == "QEMU" and inv.system.boot_mode == "bios" and inv.system.secure_boot is None
    assert inv.system.firmware_vendor == "SeaBIOS" and inv.system.uuid is None  # empty DMI field
    vda = disks(inv)["vda"]
    # virtio-blk exposes its serial on the block device itself; udev never ran here
    assert (vda.serial, vda.tran, vda.vendor, vda.hctl, vda.wwn) == (
        "sledge-target",
        "virtio",
        "0x1af4",
        None,
        None,
    )
    assert vda.size == 10 * GiB and vda.rotational and vda.by_path == () and vda.path == "/dev/vda"
    (nic,) = inv.nics
    assert (nic.name, nic.driver, nic.pci_address, nic.carrier) == (
        "eth0",
        "virtio_net",
        "0000:00:03.0",
        True,
    )
    assert nic.speed_mbps is None and [a.address for a in nic.addresses] == ["10.0.2.15"]
    assert inv.memory.dimms[0].size == 2 * GiB and inv.memory.dimms[0].type == "RAM"
    assert (inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads) == (1, 2, 2)


def test_server_identity_firmware_cpu_memory_bmc() -> None:
    inv = load("server")
    s = inv.system
    assert (s.vendor, s.product, s.serial) == ("Dell Inc.", "PowerEdge R650", "7XK2JH3")
    assert s.uuid == "4c4c4544-0058-4b10-8032-b7c04f4a4833"
    assert (s.firmware_version, s.firmware_date, s.boot_mode, s.secure_boot) == (
        "1.10.2",
        "06/15/2023",
        "uefi",
        True,
    )
    assert (inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads, inv.cpu.arch) == (2, 8, 16, "x86_64")
    assert "avx512f" in inv.cpu.flags
    assert [(d.locator, d.size, d.type, d.speed_mts, d.part_number) for d in inv.memory.dimms] == [
        ("A1", 32 * GiB, "DDR4", 3200, "M393A4K40EB3-CWE"),
        ("B1", 32 * GiB, "DDR4", 3200, "M393A4K40EB3-CWE"),
    ]  # the empty slot A2 is not a DIMM
    assert inv.memory.physical == 64 * GiB and inv.memory.total < inv.memory.physical
    assert inv.bmc_address == "192.0.2.42"


def test_server_disks_sata_sas_raid_nvme() -> None:
    d = disks(load("server"))
    sda = d["sda"]
    assert (sda.model, sda.vendor, sda.serial, sda.tran, sda.hctl) == (
        "SAMSUNG MZ7LH480",  # ID_MODEL_ENC decoded, padding squeezed
        "ATA",
        "S45PNA0M123456",
        "sata",
        "0:0:0:0",
    )
    assert (sda.wwn, sda.wwn_with_extension, sda.wwn_vendor_extension) == ("0x5002538e40a1b2c3",) * 2 + (
        None,
    )
    assert sda.by_path == (
        "/dev/disk/by-path/pci-0000:00:17.0-ata-1",
        "/dev/disk/by-path/pci-0000:00:17.0-ata-1.0",
    )
    assert "/dev/disk/by-id/wwn-0x5002538e40a1b2c3" in sda.by_id
    assert (sda.logical_sector_size, sda.physical_sector_size, sda.rotational) == (512, 4096, False)
    # no udev data for the SAS disk: VPD page 0x80 and wwid stand in
    sdb = d["sdb"]
    assert (sdb.serial, sdb.wwn, sdb.tran, sdb.rotational, sdb.vendor) == (
        "ZC1A2B3C",
        "0x5000c500a1b2c3d4",
        "sas",
        True,
        "SEAGATE",
    )
    sdc = d["sdc"]  # NAA type 6 with a vendor extension, split as scsi_id does
    assert (sdc.wwn, sdc.wwn_with_extension, sdc.wwn_vendor_extension) == (
        "0x600508b1001c7f1d",
        "0x600508b1001c7f1d2a3b4c5d6e7f8091",
        "0x2a3b4c5d6e7f8091",
    )
    nvme = d["nvme0n1"]
    assert (nvme.tran, nvme.serial, nvme.wwn, nvme.hctl) == (
        "nvme",
        "PHAB1234567812ABC",
        "eui.01000000000000005cd2e4a1b2c3d4e0",
        None,
    )
    assert nvme.size == 1600321314816 and d["sr0"].kind == "rom"
    assert all(not x.mounts and not x.holds_root for x in d.values())


def test_server_nics_and_pci() -> None:
    inv = load("server")
    nics = {n.name: n for n in inv.nics}
    assert (nics["eno1"].speed_mbps, nics["eno1"].mtu, nics["eno1"].driver) == (25000, 9000, "ice")
    assert nics["eno2"].speed_mbps is None and nics["eno2"].carrier is None  # link down: sysfs refuses
    assert not nics["bond0"].physical and nics["bond0"].permanent_mac is None and nics["bond0"].driver is None
    pci = {p.address: p for p in inv.pci_devices}
    assert (pci["0000:3b:00.0"].class_id, pci["0000:3b:00.0"].driver) == ("0x010802", "nvme")
    assert pci["0000:00:1f.4"].driver is None


def test_usb_stick_and_sd_card() -> None:
    inv = load("usb-and-sd")
    d = disks(inv)
    assert inv.system.boot_mode == "uefi" and inv.system.secure_boot is None  # efivar unreadable
    usb = d["sda"]
    assert (usb.tran, usb.removable, usb.hctl, usb.serial) == ("usb", True, "6:0:0:0", "4C530001230415117362")
    # links known only from udev's DEVLINKS (no /dev/disk in this tree)
    assert usb.by_id == ("/dev/disk/by-id/usb-SanDisk_Ultra_4C530001230415117362-0:0",)
    assert [(p.name, p.number, p.start) for p in usb.partitions] == [("sda1", 1, 1 << 20)]
    sd = d["mmcblk0"]
    assert (sd.tran, sd.removable, sd.serial) == ("mmc", False, "0x1234abcd")
    assert d["nvme0n1"].wwn == "eui.002538b411a2b3c4" and d["nvme0n1"].wwn_with_extension is None


def test_installed_system_mounts_holders_swap_and_root() -> None:
    d = disks(load("installed"))
    sda = d["sda"]
    assert sda.holds_root  # through sda2 -> dm-0 mounted at /
    assert sda.mounts == ("/boot/efi", "[SWAP]", "/")
    parts = {p.name: p for p in sda.partitions}
    assert parts["sda2"].holders == ("dm-0",) and parts["sda2"].mounts == ("/",)
    assert parts["sda3"].mounts == ("[SWAP]",) and parts["sda1"].size == 512 << 20
    assert d["dm-0"].kind == "dm" and d["dm-0"].holds_root
    assert d["sdc"].mounts == ("/data",) and not d["sdc"].holds_root
    assert d["sdb"].mounts == () and d["sdb"].tran == "sata"
    assert d["loop0"].kind == "loop"


def test_this_machine_recording() -> None:
    inv = load("this-machine")
    root_disks = [x for x in inv.disks if x.holds_root]
    assert len(root_disks) == 1 and "/" in root_disks[0].mounts


def test_wire_is_strict() -> None:
    wire = load("qemu-guest").to_wire()
    bad = json.loads(json.dumps(wire))
    bad["disks"][0]["size"] = "10G"
    with pytest.raises(WireError, match=r"inventory\.disks\[0\]\.size: expected an integer"):
        Inventory.from_wire(bad)
    bad = json.loads(json.dumps(wire))
    bad["disks"][0]["rotational"] = 1
    with pytest.raises(WireError, match="expected a boolean"):
        Inventory.from_wire(bad)
    bad = json.loads(json.dumps(wire))
    bad["system"]["colour"] = "red"
    with pytest.raises(WireError, match="unknown keys"):
        Inventory.from_wire(bad)
    bad = json.loads(json.dumps(wire))
    del bad["nics"]
    with pytest.raises(WireError, match="missing keys"):
        Inventory.from_wire(bad)
    bad = json.loads(json.dumps(wire))
    bad["version"] = 2
    with pytest.raises(WireError, match="version"):
        Inventory.from_wire(bad)
    with pytest.raises(WireError):
        Inventory.from_wire([])


@pytest.mark.parametrize(
    ("wwid", "expected"),
    [
        ("naa.5000c500a1b2c3d4", ("0x5000c500a1b2c3d4", "0x5000c500a1b2c3d4", None)),
        (
            "naa.600508B1001C7F1D2A3B4C5D6E7F8091",
            ("0x600508b1001c7f1d", "0x600508b1001c7f1d2a3b4c5d6e7f8091", "0x2a3b4c5d6e7f8091"),
        ),
        ("eui.002538b411a2b3c4", ("eui.002538b411a2b3c4", None, None)),
        ("", (None, None, None)),
    ],
)
def test_wwn_from_wwid(wwid: str, expected: tuple[str | None, ...]) -> None:
    assert wwn_from_wwid(wwid) == expected


def test_small_parsers() -> None:
    assert serial_from_vpd80(bytes([0, 0x80, 0, 6]) + b"AB12  ") == "AB12"
    assert serial_from_vpd80(bytes([0, 0x83, 0, 2]) + b"AB") is None
    assert serial_from_vpd80(None) is None
    assert decode_udev("Samsung\\x20SSD\\x20\\x20980") == "Samsung SSD 980"
    assert (
        parse_ipmitool_lan("IP Address Source : DHCP\nIP Address              : 192.0.2.9\n") == "192.0.2.9"
    )
    assert parse_ipmitool_lan("IP Address              : 0.0.0.0\n") is None


def test_mountinfo_escapes_and_swaps(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        "1 0 8:1 / / rw - ext4 /dev/root rw\n2 1 8:2 / /mnt/my\\040disk rw - xfs /dev/sda2 rw\n"
    )
    (tmp_path / "swaps").write_text(
        "Filename Type Size Used Priority\n/dev/sdb1 partition 1 0 -2\n/swapfile file 1 0 -3\n"
    )
    table = read_mounts(Tree(tmp_path))
    assert table.root_devnum == "8:1" and table.by_devnum["8:2"] == ("/mnt/my disk",)
    assert table.swaps == {"sdb1"}


def test_smbios_memory_device_sizes() -> None:
    def record(size: int, ext: int = 0) -> bytes:
        raw = bytearray(0x28)
        raw[0], raw[1] = 17, 0x28
        struct.pack_into("<H", raw, 0x0C, size)
        struct.pack_into("<I", raw, 0x1C, ext)
        return bytes(raw) + b"\0\0"

    assert parse_smbios_memory_device(record(0x8000 | 512)) is not None
    assert parse_smbios_memory_device(record(0x8000 | 512)).size == 512 << 10  # type: ignore[union-attr]
    assert parse_smbios_memory_device(record(0x7FFF, 65536)).size == 64 * GiB  # type: ignore[union-attr]
    assert parse_smbios_memory_device(record(0)) is None
    assert parse_smbios_memory_device(record(0xFFFF)) is None
    assert parse_smbios_memory_device(b"\x11\x28") is None  # truncated
    assert parse_smbios_memory_device(b"\x10" + bytes(0x30)) is None  # another type


def test_collect_on_this_machine() -> None:
    started = time.perf_counter()
    inv = collect()
    elapsed = time.perf_counter() - started
    assert inv.cpu.threads >= 1 and inv.cpu.cores >= 1 and inv.memory.total > 0
    assert elapsed < 5, f"inventory took {elapsed:.2f} s"  # ~0.03 s here; loose for a loaded CI box
    assert Inventory.from_wire(json.loads(json.dumps(inv.to_wire()))) == inv
