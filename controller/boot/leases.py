"""MAC -> leased IPv4 from dnsmasq's lease file (for the enrollment checks of issue 16).

A line is `EXPIRY MAC IP HOSTNAME CLIENT-ID` (EXPIRY 0: infinite). The file is dnsmasq's, so
every line is read as untrusted: bad lines are skipped, never raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

MAX_LEASE_FILE = 16 << 20  # far beyond any provisioning network's leases


def parse(text: str, mac: str, now: float) -> IPv4Address | None:
    """The address leased to `mac` (lower-case, colon-separated) that has not expired, else None."""
    found: IPv4Address | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[1].lower() != mac:
            continue
        try:
            expiry, address = int(fields[0]), IPv4Address(fields[2])
        except ValueError:
            continue
        if expiry == 0 or expiry > now:
            found = address  # the last line for a MAC is dnsmasq's latest
    return found


def lookup(lease_file: Path | None, mac: str, now: float) -> IPv4Address | None:
    """None when sledge runs no DHCP (no lease file) or the MAC holds no current lease."""
    if lease_file is None:
        return None
    try:
        with open(lease_file, "rb") as f:
            data = f.read(MAX_LEASE_FILE)
    except FileNotFoundError:
        return None
    return parse(data.decode("ascii", errors="replace"), mac.lower(), now)


class DnsmasqLeases:
    """controller.trust.leases.Leases over dnsmasq's lease file: `address(mac)` for enrollment."""

    def __init__(self, lease_file: Path, clock: Callable[[], float] = time.time) -> None:
        self.lease_file = lease_file
        self.clock = clock

    def address(self, mac: str) -> str | None:
        found = lookup(self.lease_file, mac, self.clock())
        return str(found) if found is not None else None
