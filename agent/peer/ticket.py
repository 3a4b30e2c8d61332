"""Tickets: proof that the controller let a machine fetch one image's chunks from peers.

Scheme: HMAC-SHA256 under a per-image fleet key. The controller derives the key for an image
and a time epoch from a secret only it holds, key = HMAC(secret, "sledge-peer-key" | digest |
epoch), and hands it, with a ticket of the agent's own, only to agents that hold a running
deploy job for that image. A ticket is (image digest, holder machine id, key epoch, expiry)
plus the MAC of those under that key; a peer that was handed the same key checks it with no
call to the controller, in constant time.

Why not Ed25519: the agent may not import `cryptography` (tests/unit/test_layering.py) and the
live image is at its size budget, while hmac/hashlib are in the standard library and cost a
microsecond per check. What a shared key gives away: any agent deploying the image can mint
tickets for that image, which admit it to exactly what it may fetch already; keys are per image
and per epoch, so a holder of one cannot mint tickets for another image or past its epoch.
Tickets are bearer tokens: one sniffed off the wire admits its thief until it expires (minutes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from agent.peer.errors import TicketInvalid

__all__ = ["Ticket", "TicketInvalid", "encode", "fleet_key", "parse", "verify"]

VERSION = "t1"
KEY_LABEL = b"sledge-peer-key"
MAX_TICKET = 256
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HOLDER = re.compile(r"[a-z]-[0-9a-f]{12}")
_FIELDS = re.compile(
    r"t1\.([0-9a-f]{64})\.([a-z]-[0-9a-f]{12})\.([0-9]{1,12})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})"
)


@dataclass(frozen=True)
class Ticket:
    digest: str  # the manifest digest of the image it admits to
    holder: str  # the machine it was issued to
    epoch: int  # which fleet key signed it
    expires: int  # unix seconds

    def __post_init__(self) -> None:
        if not _DIGEST.fullmatch(self.digest):
            raise ValueError(f"ticket digest: expected 64 lowercase hex characters, got {self.digest!r}")
        if not _HOLDER.fullmatch(self.holder):
            raise ValueError(f"ticket holder: expected a machine id like m-0123456789ab, got {self.holder!r}")
        if not 0 <= self.epoch < 10**12 or not 0 <= self.expires < 10**12:
            raise ValueError(
                f"ticket epoch/expires: expected 0 <= n < 10**12, got {self.epoch}/{self.expires}"
            )

    def signed_part(self) -> str:
        return f"{VERSION}.{self.digest}.{self.holder}.{self.epoch}.{self.expires}"


def fleet_key(secret: bytes, digest: str, epoch: int) -> bytes:
    """The key of one image for one epoch (controller side: only it holds `secret`)."""
    return hmac.new(
        secret, KEY_LABEL + b"|" + digest.encode() + b"|" + str(epoch).encode(), hashlib.sha256
    ).digest()


def _mac(key: bytes, text: str) -> str:
    tag = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(tag).rstrip(b"=").decode()


def encode(ticket: Ticket, key: bytes) -> str:
    text = ticket.signed_part()
    return f"{text}.{_mac(key, text)}"


def parse(text: str) -> tuple[Ticket, str]:
    """The ticket's fields and its MAC, unchecked (the peer needs the epoch to pick the key)."""
    if len(text) > MAX_TICKET:
        raise TicketInvalid(f"expected at most {MAX_TICKET} characters, got {len(text)}")
    match = _FIELDS.fullmatch(text)
    if match is None:
        raise TicketInvalid("expected t1.<digest>.<machine id>.<epoch>.<expires>.<mac>")
    digest, holder, epoch, expires, mac = match.groups()
    return Ticket(digest, holder, int(epoch), int(expires)), mac


def verify(text: str, keys: dict[int, bytes], digest: str, now: float) -> Ticket:
    """The ticket if `keys` (epoch -> key of this image) signed it for `digest` and it has not
    expired; TicketInvalid naming the reason otherwise."""
    ticket, mac = parse(text)
    key = keys.get(ticket.epoch)
    if key is None:
        raise TicketInvalid(f"key epoch {ticket.epoch} unknown here (known: {sorted(keys) or 'none'})")
    if not hmac.compare_digest(mac, _mac(key, ticket.signed_part())):
        raise TicketInvalid(f"MAC does not match (holder {ticket.holder})")
    if ticket.digest != digest:
        raise TicketInvalid(f"issued for image {ticket.digest[:16]}, expected {digest[:16]}")
    if ticket.expires <= now:
        raise TicketInvalid(f"expired {now - ticket.expires:.0f} s ago (holder {ticket.holder})")
    return ticket
