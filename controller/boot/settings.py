"""What the operator asked for: DHCP mode, interface, range, lease time, which EFI iPXE.

Parsing the flags' text is here too, so `sledge serve` and `sledge dhcp-config` agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal, cast, get_args

from controller.boot.errors import OptionError

Mode = Literal["off", "proxy", "full"]
EfiBinary = Literal["snponly", "ipxe"]
MODES: tuple[str, ...] = get_args(Mode)
EFI_BINARIES: tuple[str, ...] = get_args(EfiBinary)
BIOS_FILE = "undionly.kpxe"
MIN_LEASE = 120  # dnsmasq's own floor: shorter leases are raised to two minutes


@dataclass(frozen=True)
class DhcpRange:
    start: IPv4Address
    end: IPv4Address

    def __str__(self) -> str:
        return f"{self.start},{self.end}"


@dataclass(frozen=True)
class DhcpOptions:
    """`--dhcp`, `--interface`, `--dhcp-range`, `--lease-time`, `--ipxe-efi`."""

    mode: Mode = "off"
    interface: str = ""
    range: DhcpRange | None = None
    lease_time: int = 3600
    ipxe_efi: EfiBinary = "snponly"
    ipxe_dir: Path = Path("/usr/lib/ipxe")  # Debian's `ipxe` package
    dnsmasq: str = "dnsmasq"  # Debian's `dnsmasq-base`

    @property
    def efi_file(self) -> str:
        return f"{self.ipxe_efi}.efi"

    @property
    def boot_files(self) -> tuple[str, str]:
        return (BIOS_FILE, self.efi_file)


def parse_mode(text: str) -> Mode:
    if text in MODES:
        return cast(Mode, text)
    raise OptionError("--dhcp", f"one of {', '.join(MODES)}", repr(text))


def parse_efi(text: str) -> EfiBinary:
    if text in EFI_BINARIES:
        return cast(EfiBinary, text)
    raise OptionError("--ipxe-efi", f"one of {', '.join(EFI_BINARIES)}", repr(text))


def parse_range(text: str) -> DhcpRange:
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError(text)
        start, end = IPv4Address(parts[0]), IPv4Address(parts[1])
    except ValueError:
        raise OptionError(
            "--dhcp-range", "FIRST,LAST IPv4 addresses, e.g. 10.0.0.100,10.0.0.200", repr(text)
        ) from None
    if start > end:
        raise OptionError("--dhcp-range", "FIRST not after LAST", repr(text))
    return DhcpRange(start, end)


_DURATION = re.compile(r"^(\d+)([smh]?)$")


def parse_lease_time(text: str) -> int:
    """Seconds, or with a unit: 120, 90m, 12h."""
    m = _DURATION.match(text.strip())
    if not m:
        raise OptionError(
            "--lease-time", "seconds, or a number with s, m or h (e.g. 3600, 90m, 12h)", repr(text)
        )
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds < MIN_LEASE:
        raise OptionError("--lease-time", f"at least {MIN_LEASE} seconds (dnsmasq's minimum)", f"{seconds} s")
    return seconds
