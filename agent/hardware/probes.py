"""Facts that do not come from reading files under a root: udev properties, addresses,
permanent MACs, the BMC. Injected as a Probes value; the real probes ask this machine,
RecordedProbes replays a JSON recording (fixture trees carry one as probes.json).
"""

from __future__ import annotations

import array
import fcntl
import json
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.hardware.model import Address

UdevLookup = Callable[[str, str], Mapping[str, str]]  # (subsystem, kernel name) -> properties


@dataclass(frozen=True)
class Probes:
    udev: UdevLookup
    addresses: Callable[[], Mapping[str, Sequence[Address]]]
    permanent_mac: Callable[[str], str | None]
    bmc_address: Callable[[], str | None]


def no_udev(subsystem: str, name: str) -> Mapping[str, str]:
    return {}


def real_probes() -> Probes:
    return Probes(
        udev=pyudev_lookup(),
        addresses=psutil_addresses,
        permanent_mac=ethtool_permanent_mac,
        bmc_address=ipmitool_bmc_address,
    )


def pyudev_lookup() -> UdevLookup:
    """udev properties through libudev. Without udevd the database is empty and only the
    kernel's uevent properties come back; callers fall back to sysfs for the rest."""
    try:
        import pyudev

        context = pyudev.Context()
    except Exception:  # no libudev in this image: sysfs alone still works
        return no_udev

    def lookup(subsystem: str, name: str) -> Mapping[str, str]:
        try:
            device = pyudev.Devices.from_name(context, subsystem, name.replace("/", "!"))
            return {str(k): str(v) for k, v in device.properties.items()}
        except Exception:  # a device that vanished, or a broken db entry
            return {}

    return lookup


def psutil_addresses() -> Mapping[str, Sequence[Address]]:
    import psutil  # no stubs in the dev set

    result: dict[str, list[Address]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                family = "inet"
            elif a.family == socket.AF_INET6:
                family = "inet6"
            else:
                continue
            result.setdefault(name, []).append(
                Address(family, a.address.split("%")[0], _prefixlen(a.netmask))
            )
    return result


def _prefixlen(netmask: str | None) -> int | None:
    if not netmask:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in netmask else socket.AF_INET, netmask)
    except OSError:
        return None
    return sum(bin(b).count("1") for b in packed)


_SIOCETHTOOL = 0x8946
_ETHTOOL_GPERMADDR = 0x20
_MAX_ADDR_LEN = 32


def ethtool_permanent_mac(ifname: str) -> str | None:
    """ETHTOOL_GPERMADDR: the burned-in MAC, which bonding or a spoofed address hide from sysfs."""
    buf = array.array("B", struct.pack("II", _ETHTOOL_GPERMADDR, _MAX_ADDR_LEN) + bytes(_MAX_ADDR_LEN))
    addr, _ = buf.buffer_info()
    ifreq = struct.pack("16sP", ifname.encode()[:15], addr)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
    except OSError:
        return None
    size = struct.unpack_from("I", buf, 4)[0]
    mac = bytes(buf[8 : 8 + min(size, _MAX_ADDR_LEN)])
    if not mac or not any(mac):
        return None
    return ":".join(f"{b:02x}" for b in mac)


def ipmitool_bmc_address(timeout: float = 3.0) -> str | None:
    if shutil.which("ipmitool") is None or not Path("/dev/ipmi0").exists():
        return None
    for channel in ("1", "2", "8"):  # vendors put the LAN channel in different places
        try:
            out = subprocess.run(
                ["ipmitool", "lan", "print", channel],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        address = parse_ipmitool_lan(out)
        if address is not None:
            return address
    return None


def parse_ipmitool_lan(output: str) -> str | None:
    m = re.search(r"^IP Address\s*:\s*(\S+)\s*$", output, re.MULTILINE)
    if m is None or m.group(1) == "0.0.0.0":
        return None
    return m.group(1)


@dataclass(frozen=True)
class RecordedProbes:
    """Probes answering from a recording: {"udev": {subsystem: {name: {...}}},
    "addresses": {ifname: [[family, address, prefixlen], ...]}, "permanent_mac": {ifname: mac},
    "bmc_address": str | null}."""

    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RecordedProbes:
        return cls(json.loads(path.read_text()))

    def probes(self) -> Probes:
        udev: Mapping[str, Mapping[str, Mapping[str, str]]] = self.data.get("udev", {})
        addresses = {
            name: [Address(f, a, p) for f, a, p in rows]
            for name, rows in self.data.get("addresses", {}).items()
        }
        perm: Mapping[str, str] = self.data.get("permanent_mac", {})
        bmc: str | None = self.data.get("bmc_address")
        return Probes(
            udev=lambda subsystem, name: udev.get(subsystem, {}).get(name, {}),
            addresses=lambda: addresses,
            permanent_mac=perm.get,
            bmc_address=lambda: bmc,
        )
