"""One deploying agent's view of the swarm for its image: what it holds, what its peers hold, its
origin share, its ticket and the fleet keys; announces to the tracker on a thread of its own.

The writer sees it through two hooks (agent.writer.pipeline.WriteOptions): `order` yields the
fetches the agent's origin share first, then rarest-first among the chunks its peers hold
(random among equals, sampled so a step costs the same for any image size), and `on_verified`
marks a chunk held once it is on the target. The peer server (agent.peer.server) and the peer
source (agent.peer.source) read the same view.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent import protocol as p
from agent.image.manifest import Chunk, ChunkKind, Manifest
from agent.peer.bitmap import Have
from agent.peer.errors import PeerError
from agent.peer.ticket import key_name
from agent.writer.plan import Action, Step

Announcer = Callable[[p.Announce], p.AnnounceReply]
SAMPLE = 64  # pending fetches weighed per step
# Origin shares are paced: chunk i of an agent's share is fetched from the origin once the swarm
# holds all but WINDOW of the chunks below i. Without it every share starts at once, the origin's
# egress is split N ways, and no chunk exists anywhere until all of them do.
WINDOW = 4
# Fleet keys kept: this and the next epoch's, and the two before them (peers that announced before
# an epoch ended or before the controller restarted still sign with those for a while).
KEYS_KEPT = 4


def remember_keys(keys: dict[str, bytes], grant: p.PeerGrant) -> None:
    """Add the keys a grant hands over (its epoch's and the next one's), newest last, keeping KEYS_KEPT."""
    named = [(key_name(grant.kid, grant.epoch), grant.key)]
    if grant.next_key:
        named.append((key_name(grant.kid, grant.epoch + 1), grant.next_key))
    for name, key in named:
        keys.pop(name, None)
        keys[name] = bytes.fromhex(key)
    for name in list(keys)[:-KEYS_KEPT]:
        del keys[name]


@dataclass(frozen=True)
class PeerDropped:
    """A peer this agent stops asking: it served bad bytes, refused the ticket, failed or crawled."""

    url: str
    reason: str


class Swarm:
    def __init__(
        self,
        manifest: Manifest,
        digest: str,
        job_id: str,
        announcer: Announcer,
        on_drop: Callable[[PeerDropped], None] = lambda _: None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.manifest = manifest
        self.digest = digest
        self.job_id = job_id
        self.announcer = announcer
        self.on_drop = on_drop
        self.clock = clock
        self.rng = rng or random.Random()
        self.port = 0  # set by the server once it listens
        self.have = Have(len(manifest))
        self.wanted = 0  # the chunks worth holding: data chunks
        self.by_digest: dict[bytes, list[int]] = {}
        for chunk in manifest:
            if chunk.kind is ChunkKind.DATA:
                self.wanted |= 1 << chunk.index
                self.by_digest.setdefault(chunk.digest, []).append(chunk.index)
        self.lock = threading.Condition()
        self.peers: dict[str, Have] = {}  # url -> what it held when the tracker last said
        self.dropped: dict[str, str] = {}  # url -> why
        self.slot, self.of = 0, 1
        self.grant: p.PeerGrant | None = None
        self.offset = 0.0  # the controller's clock minus ours, learned at each announce
        self.keys: dict[str, bytes] = {}  # key name -> fleet key: the last few the controller gave
        self.interval = 2.0
        self.announces = 0
        self.union = Have(len(manifest))  # what anyone in the swarm holds, as the tracker last said
        self.progress = time.monotonic()  # when this agent or the swarm last got a new chunk

    # -- the tracker -----------------------------------------------------------------------------------

    def announce(self, leaving: bool = False) -> None:
        """One announce; raises what the announcer raises (the caller decides how to go on)."""
        with self.lock:
            message = p.Announce(
                self.job_id,
                self.digest,
                self.port,
                len(self.manifest),
                self.have.encode(),
                self.have.complete(self.wanted),
                leaving,
            )
        reply = self.announcer(message)
        if leaving:
            return
        with self.lock:
            self.grant = reply.grant
            remember_keys(self.keys, reply.grant)
            if reply.grant.now > 0:
                # tickets expire by the controller's clock: a live image's clock may be far off
                self.offset = reply.grant.now - self.clock()
            self.slot, self.of, self.interval = reply.seed_slot, reply.seed_of, reply.interval
            try:
                union = Have.decode(reply.swarm_have, len(self.manifest))
            except PeerError:
                union = Have(len(self.manifest))
            if union.bits & ~self.union.bits:
                self.progress = time.monotonic()
            self.union = union
            for info in reply.peers:
                if info.url in self.dropped:
                    continue
                try:
                    self.peers[info.url] = Have.decode(info.have, len(self.manifest))
                except PeerError:
                    continue  # the controller's answer is odd; that peer is left out
            self.announces += 1
            self.lock.notify_all()

    def run(self, stop: threading.Event, log: Callable[[str], None]) -> None:
        """Announce every interval until `stop`; a failed announce keeps the last view."""
        while not stop.wait(self.interval):
            try:
                self.announce()
            except Exception as exc:  # the deploy goes on with the peers it knows, then the origin
                log(f"peers: announce failed: {exc}")

    # -- what the writer and the peer source ask -----------------------------------------------------

    def on_verified(self, chunk: Chunk) -> None:
        with self.lock:
            self.have.add(chunk.index)
            self.progress = time.monotonic()

    def ticket(self) -> str:
        with self.lock:
            return self.grant.ticket if self.grant else ""

    def mine(self, index: int) -> bool:
        """The chunk is this agent's to fetch from the origin (its share, or nobody else is left)."""
        with self.lock:
            return index % self.of == self.slot

    def paced(self, index: int) -> bool:
        """The origin may be asked for this chunk now: the swarm holds all but WINDOW of those below."""
        with self.lock:
            below = self.wanted & ((1 << index) - 1)
            missing = (below & ~(self.union.bits | self.have.bits)).bit_count()
            return missing <= WINDOW

    def alone(self) -> bool:
        """Nobody else in the swarm to wait for (the tracker counts those this agent dropped)."""
        with self.lock:
            return not self.peers and self.of - len(self.dropped) <= 1

    def stalled(self, patience: float) -> bool:
        """No new chunk here nor in the swarm for `patience` seconds: waiting on peers no longer pays."""
        with self.lock:
            return time.monotonic() - self.progress > patience

    def holders(self, index: int) -> list[str]:
        with self.lock:
            return [url for url, have in self.peers.items() if index in have]

    def wait_change(self, timeout: float) -> None:
        with self.lock:
            self.lock.wait(timeout)

    def drop(self, url: str, reason: str) -> None:
        with self.lock:
            if url in self.dropped:
                return
            self.dropped[url] = reason
            self.peers.pop(url, None)
        self.on_drop(PeerDropped(url, reason))

    def learned(self, url: str, index: int) -> None:
        """A peer answered 404 for a chunk the tracker said it held (it re-verified and lost it)."""
        with self.lock:
            have = self.peers.get(url)
            if have is not None:
                have.bits &= ~(1 << index)

    def lookup(self, digest: str, chunk_hex: str) -> Chunk | None:
        """A chunk of this image held here with that digest, for the peer server."""
        if digest != self.digest:
            return None
        try:
            indices = self.by_digest.get(bytes.fromhex(chunk_hex), [])
        except ValueError:
            return None
        with self.lock:
            for i in indices:
                if i in self.have:
                    return self.manifest.chunk(i)
        return None

    def forget(self, index: int) -> None:
        """A held chunk read back wrong (the disk changed under us): stop offering it."""
        with self.lock:
            self.have.bits &= ~(1 << index)

    # -- the fetch order ---------------------------------------------------------------------------------

    def order(self, steps: Iterator[Step]) -> Iterator[Step]:
        with self.lock:
            self.progress = time.monotonic()  # the write starts now: its patience starts with it
        fetches: list[Step] = []
        for step in steps:
            if step.action is Action.FETCH:
                fetches.append(step)
            else:
                yield step  # local work (checks, zeroing) first: it needs nobody
        self.rng.shuffle(fetches)
        while fetches:
            yield fetches.pop(self._pick(fetches))

    def _pick(self, pending: list[Step]) -> int:
        with self.lock:
            sample = (
                range(len(pending))
                if len(pending) <= SAMPLE
                else self.rng.sample(range(len(pending)), SAMPLE)
            )
            best, best_key = 0, (3, 0)
            for i in sample:
                index = pending[i].chunk.index
                if index % self.of == self.slot:
                    key = (0, index)  # the origin share first, lowest first (the origin is paced)
                else:
                    n = sum(1 for have in self.peers.values() if index in have)
                    key = (1, n) if n else (2, 0)  # rarest among those someone holds, then the rest
                if key < best_key:
                    best, best_key = i, key
            return best
