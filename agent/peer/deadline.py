"""A socket whose reads end by a deadline, whatever its per-read timeout.

A per-read timeout alone lets the other side hold a connection for ever by sending a byte at a
time, each within it: a caller trickling its request's headers held one of the peer server's few
connections (a handful of such callers, with no ticket, took them all), and a peer trickling its
answer's headers, or a '100 Continue' after another, held a fetch thread past every bound the
source sets on a chunk's body.
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any


class TooLarge(OSError):
    """More bytes came than were allowed before the next `within`."""


class DeadlineSocket(socket.socket):
    deadline = math.inf  # time.monotonic(): reads past it raise TimeoutError
    what = "data"
    seconds = math.inf
    left = most = math.inf  # bytes that may still be read before the next `within`, of `most`

    @classmethod
    def of(cls, sock: socket.socket) -> DeadlineSocket:
        """The same connection (its descriptor and timeout) as a DeadlineSocket."""
        timeout = sock.gettimeout()
        new = cls(sock.family, sock.type, sock.proto, sock.detach())
        new.settimeout(timeout)
        return new

    def within(self, seconds: float, what: str, most: float = math.inf) -> None:
        """Reads from now on end `seconds` from now, and after `most` bytes (`what`: what is read,
        for the error)."""
        self.deadline, self.seconds, self.what = time.monotonic() + seconds, seconds, what
        self.left = self.most = most

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.left != math.inf:
            if self.left <= 0:
                raise TooLarge(f"expected {self.what} in at most {self.most:.0f} bytes")
            nbytes = min(nbytes or len(buffer), int(self.left))
            n = self._recv_into(buffer, nbytes, flags)
            self.left -= n
            return n
        return self._recv_into(buffer, nbytes, flags)

    def _recv_into(self, buffer: Any, nbytes: int, flags: int) -> int:
        step = self.gettimeout()
        left = self.deadline - time.monotonic()
        if left == math.inf or (step is not None and step <= left):
            return super().recv_into(buffer, nbytes, flags)
        late = TimeoutError(f"expected {self.what} within {self.seconds:.1f} s; it had not all come")
        if left <= 0:
            raise late
        self.settimeout(left)
        try:
            return super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            raise late from None
        finally:
            self.settimeout(step)
