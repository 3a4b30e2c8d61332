"""The peer package's errors.

PeerError
└── TicketInvalid    a ticket that is malformed, tampered, for another image, or expired
    └── KeyUnknown   signed under a key this peer was not handed (yet): the caller tries later
"""

from __future__ import annotations

from agent.errors import SledgeError


class PeerError(SledgeError):
    """The root of the peer package's errors."""


class TicketInvalid(PeerError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"peer ticket refused: {reason}")


class KeyUnknown(TicketInvalid):
    """Not proof of a forgery: the issuing controller restarted, or this peer has not announced since."""
