"""Tickets: proof that the controller let a machine fetch one image's chunks from peers.

Scheme: HMAC-SHA256 under a per-image fleet key. The controller derives the key for an image
and a time epoch from a secret only it holds, key = HMAC(secret, "sledge-peer-key" | digest |
epoch), and hands it, with a ticket of the agent's own, only to agents that hold a running
deploy job for that image. A ticket is (image digest, holder machine id, key epoch, expiry)
plus the MAC of those under that key; a peer that was handed the same key checks it with no
call to the controller, in constant time.

Keys are named by a key id and an epoch (`key_name`): the key id is random per controller secret,
so a restarted controller's keys have new names (a peer says "key unknown", not "MAC does not
match", and the caller tries again after its next announce instead of dropping the peer). Each
grant carries the key of its epoch and of the next one, so when an epoch ends every agent already
holds the key the first new tickets are signed with.

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
from collections.abc import Mapping
from dataclasses import dataclass

from agent.peer.errors import KeyUnknown, TicketInvalid

__all__ = ["KeyUnknown", "Ticket", "TicketInvalid", "encode", "fleet_key", "key_name", "parse", "verify"]

VERSION = "t2"
KEY_LABEL = b"sledge-peer-key"
MAX_TICKET = 256
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HOLDER = re.compile(r"[a-z]-[0-9a-f]{12}")
_KID = re.compile(r"[0-9a-f]{8}")
_FIELDS = re.compile(
    r"t2\.([0-9a-f]{64})\.([a-z]-[0-9a-f]{12})\.([0-9a-f]{8})\.([0-9]{1,12})\.([0-9]{1,12})"
    r"\.([A-Za-z0-9_-]{43})"
)


@dataclass(frozen=True)
class Ticket:
    digest: str  # the manifest digest of the image it admits to
    holder: str  # the machine it was issued to
    epoch: int  # which fleet key signed it
    expires: int  # unix seconds
    kid: str = "00000000"  # the issuing controller's key id (random per secret)

    def __post_init__(self) -> None:
        if not _KID.fullmatch(self.kid):
            raise ValueError(f"ticket key id: expected 8 lowercase hex characters, got {self.kid!r}")
        if not _DIGEST.fullmatch(self.digest):
            raise ValueError(f"ticket digest: expected 64 lowercase hex characters, got {self.digest!r}")
        if not _HOLDER.fullmatch(self.holder):
            raise ValueError(f"ticket holder: expected a machine id like m-0123456789ab, got {self.holder!r}")
        if not 0 <= self.epoch < 10**12 or not 0 <= self.expires < 10**12:
            raise ValueError(
                f"ticket epoch/expires: expected 0 <= n < 10**12, got {self.epoch}/{self.expires}"
            )

    @property
    def key(self) -> str:
        return key_name(self.kid, self.epoch)

    def signed_part(self) -> str:
        return f"{VERSION}.{self.digest}.{self.holder}.{self.kid}.{self.epoch}.{self.expires}"


def key_name(kid: str, epoch: int) -> str:
    """How a fleet key is named in a ticket and in an agent's key table."""
    return f"{kid}.{epoch}"


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
        raise TicketInvalid("expected t2.<digest>.<machine id>.<key id>.<epoch>.<expires>.<mac>")
    digest, holder, kid, epoch, expires, mac = match.groups()
    return Ticket(digest, holder, int(epoch), int(expires), kid), mac


def verify(text: str, keys: Mapping[str, bytes], digest: str, now: float) -> Ticket:
    """The ticket if `keys` (key_name -> key of this image) signed it for `digest` and it has not
    expired; TicketInvalid naming the reason otherwise (KeyUnknown: this peer lacks the key yet)."""
    ticket, mac = parse(text)
    key = keys.get(ticket.key)
    if key is None:
        raise KeyUnknown(f"key {ticket.key} unknown here (known: {sorted(keys) or 'none'})")
    if not hmac.compare_digest(mac, _mac(key, ticket.signed_part())):
        raise TicketInvalid(f"MAC does not match (holder {ticket.holder})")
    if ticket.digest != digest:
        raise TicketInvalid(f"issued for image {ticket.digest[:16]}, expected {digest[:16]}")
    if ticket.expires <= now:
        raise TicketInvalid(f"expired {now - ticket.expires:.0f} s ago (holder {ticket.holder})")
    return ticket
