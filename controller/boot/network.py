"""The interface dnsmasq serves: does it exist, and which IPv4 networks sit on it.

`ip -j addr` is the one source (it sees the network namespace the controller runs in);
parsing its answer and checking a range against it are pure.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

from controller.boot.errors import BootError, OptionError
from controller.boot.settings import DhcpRange

SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class Link:
    name: str
    addresses: tuple[IPv4Interface, ...]  # address with its prefix, e.g. 10.0.0.1/24
    ipv6_prefixes: bool = False  # a global or ULA IPv6 address: dnsmasq can advertise its prefix


def parse_ip_json(text: str) -> list[Link]:
    """`ip -j addr show` output -> links with their IPv4 addresses (and whether IPv6 has a prefix)."""
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise BootError(f"`ip -j addr`: expected JSON, got {text[:80]!r}") from exc
    links: list[Link] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("ifname"), str):
            continue
        addresses = []
        ipv6 = False
        for info in entry.get("addr_info") or []:
            if isinstance(info, dict) and info.get("family") == "inet":
                addresses.append(IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
            elif isinstance(info, dict) and info.get("family") == "inet6" and info.get("scope") == "global":
                ipv6 = True
        links.append(Link(entry["ifname"], tuple(addresses), ipv6))
    return links


def read_link(name: str) -> Link:
    """The interface by name, with its IPv4 addresses; OptionError naming --interface if absent."""
    if not name:
        raise OptionError("--interface", "the provisioning network's interface, e.g. br0", "nothing")
    if "/" in name or name in (".", "..") or not (SYS_NET / name).exists():
        have = sorted(p.name for p in SYS_NET.iterdir()) if SYS_NET.is_dir() else []
        raise OptionError(
            "--interface", f"an existing interface (here: {', '.join(have) or 'none'})", repr(name)
        )
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show", "dev", name], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BootError(f"`ip addr show dev {name}`: {exc}") from exc
    for link in parse_ip_json(out):
        if link.name == name:
            return link
    return Link(name, ())


def serving_address(link: Link) -> IPv4Interface:
    """The interface's first IPv4 address: the one machines reach the controller and TFTP on."""
    if not link.addresses:
        raise OptionError("--interface", "an interface with an IPv4 address", f"{link.name} has none")
    return link.addresses[0]


def check_range(link: Link, dhcp_range: DhcpRange) -> IPv4Interface:
    """The interface address whose subnet holds the whole range; OptionError naming --dhcp-range if none."""
    for address in link.addresses:
        net = address.network
        usable = (net.network_address, net.broadcast_address)
        if dhcp_range.start in net and dhcp_range.end in net:
            if dhcp_range.start in usable or dhcp_range.end in usable:
                raise OptionError(
                    "--dhcp-range",
                    f"host addresses of {net} (not its network or broadcast address)",
                    str(dhcp_range),
                )
            if dhcp_range.start <= address.ip <= dhcp_range.end:
                raise OptionError(
                    "--dhcp-range", f"a range without {link.name}'s own address {address.ip}", str(dhcp_range)
                )
            return address
    subnets = ", ".join(str(a.network) for a in link.addresses) or "none"
    raise OptionError("--dhcp-range", f"addresses inside {link.name}'s subnet ({subnets})", str(dhcp_range))
