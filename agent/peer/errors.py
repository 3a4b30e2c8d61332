"""The peer package's errors.

PeerError
└── TicketInvalid    a ticket that is malformed, tampered, for another image, or expired
"""

from __future__ import annotations

from agent.errors import SledgeError


class PeerError(SledgeError):
    """The root of the peer package's errors."""


class TicketInvalid(PeerError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"peer ticket refused: {reason}")
