"""Enrollment trust: pure decisions about who may become a machine (docs/trust.md).

fingerprint.py binds a machine's hardware at its first registration; limits.py counts failed
enrollments per MAC and per address; leases.py is the narrow view of sledge's own DHCP leases.
The fleet (controller.fleet.enrollment) applies them inside its transactions.
"""

from __future__ import annotations

import enum


class Discovery(enum.StrEnum):
    """open: any MAC that boots gets an enrollment token; closed: only a MAC with a queued or
    running job, or one an operator expects (`sledge machine expect MAC`)."""

    OPEN = "open"
    CLOSED = "closed"


class Refusal(enum.StrEnum):
    """Why an enrollment (or the boot that would hand out its token) was refused: the metric label."""

    TOKEN = "token"  # malformed, unknown, used, expired, or issued to another MAC
    ADDRESS = "address"  # registration from another address than the boot script's fetcher
    LEASE = "lease"  # not the address sledge's own DHCP leased to that MAC
    MAC_CONFLICT = "mac_conflict"  # the inventory claims a MAC of another registered machine
    RATE_LIMITED = "rate_limited"  # too many failures from this MAC or address
    DISCOVERY_CLOSED = "discovery_closed"  # a boot of a MAC nobody expects


def address_refusal(
    mac: str, peer: str, booted_from: str | None, leased: str | None, dhcp: bool
) -> tuple[Refusal, str] | None:
    """The address check of a registration (or, with booted_from None, of a boot); None if it passes.

    booted_from: the address that fetched the boot script holding the token (None for a boot, or a
    token minted before the address was recorded). leased: what sledge's DHCP leased to the MAC;
    only consulted when sledge runs DHCP (`dhcp`), and then a MAC without a lease is refused.
    """
    if booted_from is not None and peer != booted_from:
        return Refusal.ADDRESS, (
            f"enrollment for MAC {mac}: from address {peer}, expected {booted_from}"
            " (the address that fetched its boot script)"
        )
    if dhcp and leased != peer:
        return Refusal.LEASE, (
            f"enrollment for MAC {mac}: from address {peer}, expected "
            + (
                f"{leased} (its DHCP lease from sledge)"
                if leased
                else "an address sledge's DHCP leased to it (none)"
            )
        )
    return None
