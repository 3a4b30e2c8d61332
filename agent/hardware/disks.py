"""Block devices from sysfs, udev properties and the mount table.

udev gives the names operators know (ID_SERIAL_SHORT, ID_WWN...). In a live image
udevd may not have run, so each of those falls back to what the kernel exposes in
sysfs (device/serial, wwid, vpd_pg80), which is what udev reads in the first place.
Transport (tran) follows lsblk's rules so hints written against lsblk output match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.hardware.model import Disk, Partition
from agent.hardware.probes import UdevLookup
from agent.hardware.tree import Tree

SECTOR = 512  # sysfs sizes and starts are always in 512-byte units
SWAP = "[SWAP]"
_HCTL = re.compile(r"^\d+:\d+:\d+:\d+$")


@dataclass(frozen=True)
class MountTable:
    by_devnum: Mapping[str, tuple[str, ...]]  # "maj:min" -> mount points
    root_devnum: str | None
    swaps: frozenset[str]  # kernel names of active swap devices


def read_mounts(proc: Tree) -> MountTable:
    """From mountinfo, which names the device by number: /dev/root and by-uuid sources resolve."""
    by_devnum: dict[str, list[str]] = {}
    root = None
    for line in (proc.text("self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        devnum, mountpoint = fields[2], _unescape(fields[4])
        by_devnum.setdefault(devnum, []).append(mountpoint)
        if mountpoint == "/":
            root = devnum
    swaps = set()
    for line in (proc.text("swaps") or "").splitlines()[1:]:
        source = line.split()[0] if line.split() else ""
        if source.startswith("/dev/"):
            swaps.add(source.removeprefix("/dev/"))
    return MountTable({k: tuple(v) for k, v in by_devnum.items()}, root, frozenset(swaps))


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def decode_udev(value: str) -> str:
    """udev's *_ENC values escape bytes as \\xNN; lsblk shows them decoded, whitespace squeezed."""
    decoded = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    return " ".join(decoded.split())


def wwn_from_wwid(wwid: str) -> tuple[str | None, str | None, str | None]:
    """(wwn, wwn_with_extension, wwn_vendor_extension) as udev derives them.

    SCSI "naa." ids: scsi_id reports the first 8 bytes as the WWN and, for 16-byte
    NAA type 6 ids, the other 8 as the vendor extension. NVMe and t10 ids are used
    whole, as udev's ID_WWN does for NVMe.
    """
    wwid = wwid.strip()
    if wwid.startswith("naa."):
        hexid = wwid[4:].lower()
        if len(hexid) == 32:
            return f"0x{hexid[:16]}", f"0x{hexid}", f"0x{hexid[16:]}"
        return f"0x{hexid}", f"0x{hexid}", None
    if wwid:
        return wwid, None, None
    return None, None, None


def serial_from_vpd80(raw: bytes | None) -> str | None:
    """Unit Serial Number VPD page: 4-byte header, then the serial (length in byte 3)."""
    if raw is None or len(raw) < 4 or raw[1] != 0x80:
        return None
    value = raw[4 : 4 + raw[3]].decode("ascii", "replace").strip(" \0")
    return value or None


def collect_disks(sys: Tree, proc: Tree, dev: Tree, udev: UdevLookup) -> tuple[Disk, ...]:
    mounts = read_mounts(proc)
    links = _disk_links(dev)
    return tuple(_disk(sys, name, mounts, links, udev) for name in sys.list("block"))


def _disk_links(dev: Tree) -> dict[str, list[str]]:
    """kernel name -> /dev/disk/by-{path,id} links pointing at it."""
    result: dict[str, list[str]] = {}
    for kind in ("by-path", "by-id"):
        for entry in dev.list(f"disk/{kind}"):
            target = dev.link_name(f"disk/{kind}/{entry}")
            if target:
                result.setdefault(target, []).append(f"/dev/disk/{kind}/{entry}")
    return result


def _kind(sys: Tree, name: str) -> str:
    for prefix, kind in (("loop", "loop"), ("zram", "zram"), ("ram", "ram"), ("sr", "rom"), ("dm-", "dm")):
        if name.startswith(prefix):
            return kind
    if re.match(r"^md\d", name):
        return "md"
    if sys.int(f"block/{name}/device/type") == 5:  # SCSI peripheral type 5: CD/DVD
        return "rom"
    return "disk"


def _tran(sys: Tree, name: str, hctl: str | None) -> str | None:
    """lsblk's get_transport(), in its order."""
    if hctl is not None:
        host = f"host{hctl.split(':')[0]}"
        scsi = f"block/{name}/device"
        if sys.exists(f"class/spi_host/{host}"):
            return "spi"
        if sys.exists(f"class/fc_host/{host}"):
            symbolic = sys.text(f"class/fc_host/{host}/symbolic_name") or ""
            return "fcoe" if " over " in symbolic else "fc"
        if sys.exists(f"class/sas_host/{host}") or sys.exists(f"{scsi}/sas_device"):
            return "sas"
        if sys.exists(f"{scsi}/ieee1394_id"):
            return "sbp"
        if sys.exists(f"class/iscsi_host/{host}"):
            return "iscsi"
        if "usb" in (sys.resolve(scsi) or ""):
            return "usb"
        proc_name = sys.text(f"class/scsi_host/{host}/proc_name")
        if proc_name is not None:
            if proc_name.startswith(("ahci", "sata")):
                return "sata"
            if "ata" in proc_name:
                return "ata"
        return None
    for prefix, tran in (("nvme", "nvme"), ("vd", "virtio"), ("mmcblk", "mmc")):
        if name.startswith(prefix):
            return tran
    return None


def _devnum_closure(sys: Tree, names: list[str]) -> list[str]:
    """Kernel names reachable through holders (partitions -> dm/md -> ...), each once."""
    seen: list[str] = []
    queue = list(names)
    while queue:
        n = queue.pop(0)
        if n not in seen:
            seen.append(n)
            queue.extend(sys.list(f"class/block/{n}/holders"))
    return seen


def _mounts_of(sys: Tree, names: list[str], mounts: MountTable) -> tuple[tuple[str, ...], bool]:
    points: list[str] = []
    holds_root = False
    for n in _devnum_closure(sys, names):
        devnum = sys.text(f"class/block/{n}/dev")
        if devnum is not None:
            points.extend(mounts.by_devnum.get(devnum, ()))
            holds_root = holds_root or devnum == mounts.root_devnum
        if n in mounts.swaps:
            points.append(SWAP)
    return tuple(dict.fromkeys(points)), holds_root


def _partitions(sys: Tree, name: str, mounts: MountTable) -> tuple[Partition, ...]:
    parts = []
    for entry in sys.list(f"block/{name}"):
        if not sys.exists(f"block/{name}/{entry}/partition"):
            continue
        base = f"block/{name}/{entry}"
        points, _ = _mounts_of(sys, [entry], mounts)
        parts.append(
            Partition(
                name=entry,
                number=sys.int(f"{base}/partition"),
                start=(sys.int(f"{base}/start") or 0) * SECTOR,
                size=(sys.int(f"{base}/size") or 0) * SECTOR,
                holders=tuple(sys.list(f"{base}/holders")),
                mounts=points,
            )
        )
    return tuple(sorted(parts, key=lambda p: (p.number or 0, p.name)))


def _disk(sys: Tree, name: str, mounts: MountTable, links: dict[str, list[str]], udev: UdevLookup) -> Disk:
    base = f"block/{name}"
    props = udev("block", name)
    # the SCSI device directory is named H:C:T:L; resolve rather than readlink, whose form varies
    device_dir = (sys.resolve(f"{base}/device") or "").rsplit("/", 1)[-1]
    hctl = device_dir if _HCTL.match(device_dir) else None
    partitions = _partitions(sys, name, mounts)
    points, holds_root = _mounts_of(sys, [name, *(p.name for p in partitions)], mounts)

    model = _udev_text(props, "ID_MODEL_ENC", "ID_MODEL") or sys.text(f"{base}/device/model")
    serial = (
        props.get("ID_SERIAL_SHORT")
        or sys.text(f"{base}/device/serial")
        or sys.text(f"{base}/serial")
        or serial_from_vpd80(sys.raw(f"{base}/device/vpd_pg80"))
    )
    wwn, wwn_ext, wwn_vendor = (
        props.get("ID_WWN"),
        props.get("ID_WWN_WITH_EXTENSION"),
        props.get("ID_WWN_VENDOR_EXTENSION"),
    )
    if wwn is None:
        wwn, wwn_ext, wwn_vendor = wwn_from_wwid(
            sys.text(f"{base}/wwid") or sys.text(f"{base}/device/wwid") or ""
        )
    devlinks = [p for p in props.get("DEVLINKS", "").split() if p.startswith("/dev/disk/by-")]
    all_links = sorted(set(links.get(name, [])) | set(devlinks))
    return Disk(
        name=name,
        path="/dev/" + name.replace("!", "/"),
        kind=_kind(sys, name),
        size=(sys.int(f"{base}/size") or 0) * SECTOR,
        model=model,
        vendor=sys.text(f"{base}/device/vendor") or _udev_text(props, "ID_VENDOR_ENC", "ID_VENDOR"),
        serial=serial,
        wwn=wwn,
        wwn_with_extension=wwn_ext,
        wwn_vendor_extension=wwn_vendor,
        rotational=bool(sys.flag(f"{base}/queue/rotational")),
        removable=bool(sys.flag(f"{base}/removable")),
        read_only=bool(sys.flag(f"{base}/ro")),
        logical_sector_size=sys.int(f"{base}/queue/logical_block_size") or SECTOR,
        physical_sector_size=sys.int(f"{base}/queue/physical_block_size") or SECTOR,
        tran=_tran(sys, name, hctl),
        hctl=hctl,
        by_path=tuple(p for p in all_links if p.startswith("/dev/disk/by-path/")),
        by_id=tuple(p for p in all_links if p.startswith("/dev/disk/by-id/")),
        partitions=partitions,
        holders=tuple(sys.list(f"{base}/holders")),
        mounts=points,
        holds_root=holds_root,
    )


def _udev_text(props: Mapping[str, str], encoded: str, plain: str) -> str | None:
    if encoded in props:
        return decode_udev(props[encoded]) or None
    value = props.get(plain)
    return value.strip() or None if value else None
