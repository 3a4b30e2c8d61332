"""What sledge's own DHCP server leased: MAC -> address. The narrow interface enrollment needs.

sledge running no DHCP is `None` where a `Leases` is expected (the check is then skipped). The
dnsmasq lease-file reader belongs with the DHCP work (controller/boot/, issue 12) and only has to
answer `address(mac)`; StaticLeases stands in for it in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Leases(Protocol):
    def address(self, mac: str) -> str | None:
        """The address currently leased to this (normalized) MAC, None if it holds no lease."""


class StaticLeases:
    """A fixed table of leases (tests, or a site that pins addresses by MAC)."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._table = dict(table)

    def address(self, mac: str) -> str | None:
        return self._table.get(mac)
