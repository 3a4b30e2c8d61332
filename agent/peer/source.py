"""The peer source: a ChunkSource (agent.writer.sources) that fetches from the agent's peers.

For a chunk of the agent's origin share it answers "missing" (the writer goes on to the mirrors
and the origin) once the swarm holds all but a few of the chunks below it (Swarm.paced); for any
other it asks a random peer that holds it, waiting for one to appear while the swarm makes
progress (unless it is alone in the swarm), then answers "missing" too. Peers send the image bytes
(`serves_raw`), which are hashed here before they are returned, so a peer that serves wrong bytes
is dropped by name while the source stays; the writer hashes them again like any source's. A peer
that refuses the ticket, fails, or sends slower than `min_rate` is dropped as well.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from dataclasses import dataclass

import blake3

from agent.image.manifest import Chunk
from agent.peer.bucket import TokenBucket
from agent.peer.server import PEER_PATH
from agent.peer.swarm import Swarm
from agent.writer.errors import FetchError
from agent.writer.sources import ChunkSource

SLICE = 256 << 10


@dataclass(frozen=True)
class PeerOptions:
    patience: float = 30.0  # seconds without a new chunk (here or in the swarm) before the origin
    max_wait: float = 600.0  # the longest one chunk waits for peers
    timeout: float = 5.0  # per socket operation
    min_rate: float = 0.0  # bytes/s below which a peer counts as slow and is dropped; 0: never
    download: float = 0.0  # this agent's download cap in bytes/s over all sources; 0: none


class _Failed(Exception):
    def __init__(self, reason: str, drop: bool) -> None:
        super().__init__(reason)
        self.drop = drop


class PeerSource:
    name = "peers"
    serves_raw = True

    def __init__(self, swarm: Swarm, options: PeerOptions, bucket: TokenBucket | None = None) -> None:
        self.swarm = swarm
        self.options = options
        self.bucket = bucket or TokenBucket(options.download)
        self.stop = threading.Event()
        self.bytes_by_peer: dict[str, int] = {}
        self.declined: dict[str, int] = {}  # why chunks went to the sources: share, alone, stalled
        self._lock = threading.Lock()

    def _waiting(self, deadline: float) -> bool:
        """Worth waiting on: the swarm still makes progress, within the longest wait."""
        return (
            not self.stop.is_set()
            and time.monotonic() < deadline
            and not self.swarm.stalled(self.options.patience)
        )

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        # wait for the swarm while it makes progress (a chunk new to it or to this agent at least
        # every `patience` seconds), at most `max_wait` for one chunk
        deadline = time.monotonic() + self.options.max_wait
        if self.swarm.mine(chunk.index):
            while not self.swarm.paced(chunk.index) and self._waiting(deadline):
                self.swarm.wait_change(0.1)
            raise FetchError(self.name, f"chunk {chunk.index} is this agent's origin share", missing=True)
        tried: set[str] = set()
        while not self.stop.is_set():
            holders = [u for u in self.swarm.holders(chunk.index) if u not in tried]
            if not holders:
                # another member of the swarm fetches it from the origin: wait for it (a lone agent
                # goes on at once)
                why = (
                    "share"
                    if self.swarm.mine(chunk.index)
                    else "alone"
                    if self.swarm.alone()
                    else ""
                    if self._waiting(deadline)
                    else "stalled"
                )
                if why:
                    with self._lock:
                        self.declined[why] = self.declined.get(why, 0) + 1
                    raise FetchError(self.name, f"no peer holds chunk {chunk.index} ({why})", missing=True)
                self.swarm.wait_change(0.1)
                tried.clear()  # a holder that was busy (503) may have a slot now
                continue
            url = self.swarm.rng.choice(holders)
            tried.add(url)
            try:
                n = self._get(url, chunk, buf)
            except _Failed as exc:
                if exc.drop:
                    self.swarm.drop(url, str(exc))
                else:
                    self.swarm.learned(url, chunk.index)
                continue
            if n != chunk.length or blake3.blake3(buf[:n]).digest() != chunk.digest:
                self.swarm.drop(url, f"served bad bytes for {chunk.describe()}")
                continue
            with self._lock:
                self.bytes_by_peer[url] = self.bytes_by_peer.get(url, 0) + n
            return n
        raise FetchError(self.name, "interrupted")

    def _get(self, url: str, chunk: Chunk, buf: memoryview) -> int:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=self.options.timeout)
        t0 = time.monotonic()
        try:
            conn.request(
                "GET",
                f"{PEER_PATH}{self.swarm.digest}/{chunk.hex}",
                headers={"Authorization": f"Ticket {self.swarm.ticket()}"},
            )
            resp = conn.getresponse()
            if resp.status in (401, 403):
                raise _Failed(f"refused our ticket: HTTP {resp.status}", drop=True)
            if resp.status in (404, 503):
                raise _Failed(f"HTTP {resp.status}", drop=False)
            if resp.status != 200:
                raise _Failed(f"HTTP {resp.status}", drop=True)
            length = resp.getheader("Content-Length", "")
            if length != str(chunk.length):
                raise _Failed(f"Content-Length {length[:20]!r}, expected {chunk.length}", drop=True)
            got = 0
            waited = 0.0  # in our own download cap: the peer's rate leaves it out
            while got < chunk.length:
                n = resp.readinto(buf[got : min(chunk.length, got + SLICE)])
                if not n:
                    break
                got += n
                t1 = time.monotonic()
                if not self.bucket.take(n, self.stop):
                    raise _Failed("interrupted", drop=False)
                waited += time.monotonic() - t1
            if got != chunk.length:
                raise _Failed(f"closed after {got} of {chunk.length} bytes", drop=True)
            spent = max(time.monotonic() - t0 - waited, 1e-6)
            if self.options.min_rate and got > 0 and got / spent < self.options.min_rate:
                # the bytes are kept (they are checked like any); the peer is not asked again
                self.swarm.drop(
                    url, f"slow: {got / spent:.0f} bytes/s, expected >= {self.options.min_rate:.0f}"
                )
            return got
        except (OSError, http.client.HTTPException) as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}", drop=True) from None
        finally:
            conn.close()

    def get(self, relative: str, limit: int) -> bytes:
        raise FetchError(self.name, "peers serve chunks only", missing=True)

    def interrupt(self) -> None:
        self.stop.set()

    def close(self) -> None:
        self.stop.set()


class CappedSource:
    """A source under this agent's download cap (the token bucket the peer source uses too)."""

    def __init__(self, source: ChunkSource, bucket: TokenBucket) -> None:
        self.source = source
        self.bucket = bucket
        self.name = source.name

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        n = self.source.fetch_into(chunk, buf)
        self.bucket.take(n)
        return n

    def get(self, relative: str, limit: int) -> bytes:
        return self.source.get(relative, limit)

    def interrupt(self) -> None:
        self.source.interrupt()

    def close(self) -> None:
        self.source.close()
