"""A peer server that holds every chunk of an image file, on 127.0.0.1, for the peer tests.

Tickets for it are signed with KEY under key name 00000000.0 (ticket.encode(..., KEY))."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from agent.image.manifest import Manifest
from agent.peer import ticket
from agent.peer.server import PeerServer, ServeLimits
from agent.peer.swarm import Swarm
from agent.protocol import AnnounceReply, PeerGrant

KEY = b"k" * 32
S = TypeVar("S", bound=PeerServer)


@contextlib.contextmanager
def holding_all(
    src: Path, manifest: Manifest, digest: str, limits: ServeLimits, kind: type[S]
) -> Iterator[S]:
    swarm = Swarm(
        manifest, digest, "j-000000000001", lambda m: AnnounceReply(PeerGrant(0, "00" * 32, "t", 0.0))
    )
    for chunk in manifest:
        swarm.have.add(chunk.index)
    swarm.keys[ticket.key_name("00000000", 0)] = KEY
    fd = os.open(src, os.O_RDONLY)
    server = kind(swarm, fd, "127.0.0.1", 0, limits, log=lambda _: None)
    server.start()
    try:
        yield server
    finally:
        server.close()
        os.close(fd)


def settle(predicate: Callable[[], object], seconds: float = 2.0) -> bool:
    """The predicate came true within `seconds` (the server's threads finish on their own time)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
