"""One deploying agent's view of the swarm for its image: what it holds, what its peers hold, its
origin share, its ticket and the fleet keys; announces to the tracker on a thread of its own.

The writer sees it through two hooks (agent.writer.pipeline.WriteOptions): `order` yields a
fetch only once it is ready (agent.peer.pick: the agent's paced origin share first, then the
rarest of the chunks a peer not busy right now holds), waiting for the swarm to change while
nothing is; a chunk no peer can serve now goes back to it (`defer`). `on_verified` marks a chunk
held once it is on the target. The peer server and the peer source read the same view.
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
from agent.peer.pick import choose, fallback
from agent.peer.ticket import key_name
from agent.writer.plan import Action, Step

Announcer = Callable[[p.Announce], p.AnnounceReply]
# Origin shares are paced: chunk i of an agent's share is fetched from the origin once the swarm
# holds all but WINDOW of the chunks below i. Without it every share starts at once, the origin's
# egress is split N ways, and no chunk exists anywhere until all of them do.
WINDOW = 4
SHARE_WAIT = 5.0  # seconds at least before a chunk the swarm lacks passes to one more owner
EARLY = 8  # an agent's first chunks are announced as soon as they are held (see Swarm.run)
# Fleet keys kept: this and the next epoch's, and the two before them (peers that announced before
# an epoch ended or before the controller restarted still sign with those for a while).
KEYS_KEPT = 4
MAX_REPORTS = 16  # peers reported for bad bytes in one announce (the wire's bound)
# The fetch order waits for what it is told of (notify_all: an announce, a chunk verified or settled,
# a drop, a halt) and for its own deadlines; IDLE_WAIT is only a bound. Waking every 0.2 s instead
# cost a fleet of 200 simulated agents on 2 cores ~15 wake-ups a second each for nothing.
IDLE_WAIT = 1.0
CLOCK_SLACK = 0.002  # seconds past a deadline the wait ends: a wake-up just before it finds nothing


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
        # peers dropped for bytes that failed verification, to be told to the tracker at the next
        # announce (it removes a peer several agents report: a peer claiming every chunk fills the
        # union, and until then no agent could pace its share or see the swarm move)
        self.bad: list[str] = []
        self.reported: set[str] = set()  # ... each once
        # peers the tracker removed from the swarm: its seed_of no longer counts them, so they are
        # not subtracted from it again when this agent asks whether it is alone
        self.shunned: set[str] = set()
        # url -> the chunks it served here that verified since the last announce, told to the
        # tracker: it counts a peer's claim to a chunk once another agent vouched for it
        self.vouch: dict[str, int] = {}
        self.slot, self.of = 0, 1
        self.grant: p.PeerGrant | None = None
        self.offset = 0.0  # the controller's clock minus ours, learned at each announce
        self.keys: dict[str, bytes] = {}  # key name -> fleet key: the last few the controller gave
        self.interval = 2.0
        self.announces = 0
        self.union = Have(len(manifest))  # what anyone in the swarm holds, as the tracker last said
        self.progress = time.monotonic()  # when this agent or the swarm last got a new chunk
        self.busy: dict[str, float] = {}  # url -> until when (monotonic) it is not asked: it said 503
        self.patience = 30.0  # seconds without progress before fetches go to the sources (the source's)
        self.halted = threading.Event()  # the write was interrupted: stop waiting for chunks to be ready
        self.news = threading.Event()  # one of the first EARLY chunks verified: announce soon
        self.parallel = 2  # chunks fetched from peers at once (the source's options say)
        self.pending = 0  # chunks the order has still to hand out (a bitmap)
        self.inflight: set[int] = set()  # chunks handed out and not yet settled by the peer source
        # chunk -> since when (monotonic) nobody in the swarm holds it although its owner may fetch it
        # from the origin: a share whose owner is slow, stuck or gone passes on (see _owns)
        self.lacking: dict[int, float] = {}
        self.chunk_seconds = 0.0  # how long a chunk from a peer takes here lately (the source's)
        self.fetches: dict[int, Step] = {}  # the order's fetch steps, by chunk
        self.ended = False  # the order handed out its last step: a refetch is the thread's own
        # the peer that has just served a chunk here: its upload slot is free now, so the next chunk
        # is one it holds if it holds any wanted (asking a random holder found it busy 2-3 times a
        # chunk in the real fleet case, each a round trip), and the chunk handed out for it
        self.last: str | None = None
        self.follow: dict[int, str] = {}

    # -- the tracker -----------------------------------------------------------------------------------

    def announce(self, leaving: bool = False) -> None:
        """One announce; raises what the announcer raises (the caller decides how to go on)."""
        with self.lock:
            vouched = list(self.vouch.items())[: p.MAX_VOUCHES]
            message = p.Announce(
                self.job_id,
                self.digest,
                self.port,
                len(self.manifest),
                self.have.encode(),
                self.have.complete(self.wanted),
                leaving,
                tuple(self.bad[:MAX_REPORTS]),
                tuple(p.Served(url, Have(len(self.manifest), bits).encode()) for url, bits in vouched),
            )
        reply = self.announcer(message)
        if leaving:
            return
        for url in reply.shunned:
            self.drop(url, "removed from the swarm by the controller: other agents got bad bytes from it")
        with self.lock:
            self.shunned.update(reply.shunned)
            del self.bad[: len(message.bad)]  # told (a failed announce keeps them for the next)
            for url, bits in vouched:  # chunks served since stay for the next
                left = self.vouch.get(url, 0) & ~bits
                if left:
                    self.vouch[url] = left
                else:
                    self.vouch.pop(url, None)
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
            self._note_lacking(time.monotonic())
            for info in reply.peers:
                if info.url in self.dropped:
                    continue
                try:
                    self.peers[info.url] = Have.decode(info.have, len(self.manifest))
                except PeerError:
                    continue  # the controller's answer is odd; that peer is left out
            self.announces += 1
            self.lock.notify_all()

    def run(self, stop: threading.Event, log: Callable[[str], None], failing: str = "") -> None:
        """Announce every interval until `stop` (set `news` too, to wake it at once), and sooner (a
        quarter of it after the last) when one of this agent's first EARLY chunks is verified; a
        failed announce keeps the last view. A failure is logged once (each line is a job event), again
        only if it changes, and the first announce that works after it says so (`failing`: the
        failure the caller logged already)."""
        last = time.monotonic()
        while not stop.is_set():
            # a young swarm spreads a chunk one hop per announce: telling the tracker at once that we
            # hold one of our first chunks saves each hop up to an interval (later chunks wait for
            # the next announce: the tracker's load stays about one announce an interval)
            news = self.news.wait(max(0.0, last + self.interval - time.monotonic()))
            if stop.wait(max(0.0, last + self.interval / 4 - time.monotonic()) if news else 0.0):
                return
            self.news.clear()
            last = time.monotonic()
            try:
                self.announce()
            except Exception as exc:  # the deploy goes on with the peers it knows, then the origin
                if str(exc) != failing:
                    log(f"peers: announce failed: {exc} (said once; the next that works says so)")
                failing = str(exc)
            else:
                if failing:
                    log("peers: announces work again")
                failing = ""

    # -- what the writer and the peer source ask -----------------------------------------------------

    def on_verified(self, chunk: Chunk) -> None:
        with self.lock:
            self.have.add(chunk.index)
            self.progress = time.monotonic()
            self.lock.notify_all()  # it may pace this agent's next origin share
            if self.have.bits.bit_count() <= EARLY:
                self.news.set()

    def joined(self) -> bool:
        """An announce has worked: the tracker knows this agent, and this agent its peers and share."""
        with self.lock:
            return self.announces > 0

    def held(self) -> int:
        """How many chunks this agent holds (peers serve those that hold fewer first)."""
        with self.lock:
            return self.have.bits.bit_count()

    def ticket(self) -> str:
        with self.lock:
            return self.grant.ticket if self.grant else ""

    def mine(self, index: int) -> bool:
        """The chunk is this agent's to fetch from the origin: its share, and no peer it knows holds it
        (shares move when agents leave; a chunk a peer holds comes from a peer whoever's it is)."""
        with self.lock:
            return self._owns(index, time.monotonic()) and not self._known_holder(index)

    def _owns(self, index: int, now: float) -> bool:
        """This agent is one of the chunk's owners: the slot it falls to, and one more slot after it
        for every `_share_wait` the swarm has lacked it while it could have been fetched (a share
        whose owner is slow or stuck: a slowed agent's share held every other agent for 20 s)."""
        of = max(self.of, 1)
        since = self.lacking.get(index)
        extra = int((now - since) / self._share_wait()) if since is not None else 0
        return (self.slot - index) % of <= extra

    def _share_wait(self) -> float:
        # three announces (the owner's, ours, one to spare: at least SHARE_WAIT, as an agent that
        # holds nothing is told to announce more often) and two chunks' time
        return max(3 * self.interval, SHARE_WAIT) + 2 * self.chunk_seconds

    def _note_lacking(self, now: float) -> None:
        """Track which chunks the swarm lacks although their owners may fetch them (the lock held)."""
        missing = self.wanted & ~self.union.bits & ~self.have.bits
        for index in [i for i in self.lacking if not missing >> i & 1]:
            del self.lacking[index]
        while missing:
            low = missing & -missing
            missing ^= low
            index = low.bit_length() - 1
            if index not in self.lacking and self._paced(index):
                self.lacking[index] = now

    def _known_holder(self, index: int) -> bool:
        """A peer this agent knows and has not dropped holds the chunk, and the tracker counts the
        chunk as held (its union counts a peer's claims once another agent has been served by it:
        a peer claiming every chunk would keep every share from the origin)."""
        return bool(self.union.bits >> index & 1) and any(
            have.bits >> index & 1 for have in self.peers.values()
        )

    def paced(self, index: int) -> bool:
        """The origin may be asked for this chunk now: the swarm holds all but WINDOW of those below."""
        with self.lock:
            return self._paced(index)

    def alone(self) -> bool:
        """Nobody else in the swarm to wait for (the tracker counts those this agent dropped)."""
        with self.lock:
            return self._alone()

    def _alone(self) -> bool:
        # (the lock held) seed_of counts the agents in the swarm, those this agent dropped among them
        # and not those the tracker removed (shunned)
        dropped = sum(1 for url in self.dropped if url not in self.shunned)
        return not self.peers and self.of - dropped <= 1

    def stalled(self, patience: float) -> bool:
        """No new chunk here nor in the swarm for `patience` seconds: waiting on peers no longer pays."""
        with self.lock:
            return time.monotonic() - self.progress > patience

    def holders(self, index: int) -> list[str]:
        """The peers that hold the chunk and may be asked now (not in a busy peer's back-off)."""
        now = time.monotonic()
        with self.lock:
            return [
                url for url, have in self.peers.items() if index in have and self.busy.get(url, 0.0) <= now
            ]

    def backoff(self, url: str, seconds: float) -> None:
        """The peer answered 503 (its upload slots are full): leave it alone for a while."""
        with self.lock:
            self.busy[url] = time.monotonic() + seconds

    def halt(self) -> None:
        self.halted.set()
        with self.lock:
            self.lock.notify_all()

    def wait_change(self, timeout: float) -> None:
        with self.lock:
            self.lock.wait(timeout)

    def drop(self, url: str, reason: str, bad: bool = False) -> None:
        """Stop asking the peer; `bad`: it served bytes that failed verification (told to the tracker)."""
        with self.lock:
            if bad and url not in self.reported:  # told even if it was dropped before (too slow)
                self.reported.add(url)
                self.bad.append(url)
            if url in self.dropped:
                return
            self.dropped[url] = reason
            self.peers.pop(url, None)
            self.busy.pop(url, None)
            self.lock.notify_all()  # this agent may be alone now (_next_ready)
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
        with self.lock:
            for step in fetches:
                self.fetches[step.chunk.index] = step
                self.pending |= 1 << step.chunk.index
        while (index := self._next_ready()) is not None:
            yield self.fetches[index]
        with self.lock:
            self.ended = True

    def refetch(self, step: Step) -> bool:
        """A chunk an in-place check found wrong on the target (any disk not known to be blank: every
        real deploy) joins the order's fetches, to be handed out when a peer can serve it, paced and
        at most `parallel` at a time, like any; False once the order has ended (the caller fetches)."""
        with self.lock:
            if self.ended:
                return False
            self.fetches[step.chunk.index] = step
            self.pending |= 1 << step.chunk.index
            self.lock.notify_all()
            return True

    def _next_ready(self) -> int | None:
        """The next chunk to fetch, once one is ready; any pending one once waiting no longer pays
        (the swarm stalled, this agent is alone, or the write was interrupted); None when every
        chunk is fetched or being fetched elsewhere than from peers."""
        chunks = len(self.manifest)
        with self.lock:
            while True:
                if not self.pending:
                    if not self.inflight or self.halted.is_set():
                        return None
                    self.lock.wait(IDLE_WAIT)  # a chunk in flight at a peer may come back (defer)
                    continue
                if not self.announces:
                    # not in the swarm (yet: no announce has worked): the job's own sources, as fast
                    # as they go, lowest first; peers from the first announce that works on
                    low = self.pending & -self.pending
                    self.pending ^= low
                    self.inflight.add(low.bit_length() - 1)  # settled at once by the peer source
                    return low.bit_length() - 1
                if len(self.inflight) >= self.parallel and not self.halted.is_set():
                    # a few chunks at a time, each at a good share of the link: a chunk done sooner is
                    # served to others sooner (six at a sixth of the rate each held every new chunk
                    # back from the swarm for six times as long)
                    self.lock.wait(IDLE_WAIT)  # settled() says when one is no longer
                    continue
                now = time.monotonic()
                share = self._share(self.pending)
                if share is not None and not self._paced(share):
                    share = None
                free = [h.bits for url, h in self.peers.items() if self.busy.get(url, 0.0) <= now]
                known = [h.bits for h in self.peers.values()]
                index: int | None = None
                last = self.last
                if share is None and last is not None:
                    self.last = None
                    if last in self.peers and self.busy.get(last, 0.0) <= now:
                        index = choose(self.pending, None, [self.peers[last].bits], known, self.rng, chunks)
                        if index is not None:
                            self.follow[index] = last
                if index is None:
                    index = choose(self.pending, share, free, known, self.rng, chunks)
                if index is None and (
                    self.halted.is_set() or self._alone() or now - self.progress > self.patience
                ):
                    index = fallback(self.pending, self.rng, chunks)
                if index is not None:
                    self.pending &= ~(1 << index)
                    self.inflight.add(index)
                    return index
                # an announce, a verified chunk, a drop (notified) or a back-off ending, patience
                # running out (timed)
                self.lock.wait(self._wake_in(now))

    def _wake_in(self, now: float) -> float:
        """Seconds until the soonest of what _next_ready waits for by the clock (the lock held): a
        busy peer's back-off ends, the patience runs out; at most IDLE_WAIT (an origin share passing
        on, see _owns, moves in steps of several seconds)."""
        ends = [t for t in self.busy.values() if t > now]
        if self.progress + self.patience > now:
            ends.append(self.progress + self.patience)
        if not ends:
            return IDLE_WAIT
        return min(IDLE_WAIT, max(min(ends) - now + CLOCK_SLACK, CLOCK_SLACK))

    def defer(self, index: int) -> bool:
        """Hand a chunk being fetched back to the order (no peer can serve it now); False if the
        order did not hand it out (then the caller waits for it as before)."""
        with self.lock:
            if index not in self.inflight or self.halted.is_set():
                return False
            self.inflight.discard(index)
            self.pending |= 1 << index
            self.lock.notify_all()
            return True

    def served_by(self, url: str, index: int) -> None:
        """A peer has just served a chunk here whole and it verified: its slot is ours to ask for
        again first, and the tracker is told at the next announce."""
        with self.lock:
            self.last = url
            self.vouch[url] = self.vouch.get(url, 0) | 1 << index
            self.lock.notify_all()

    def after(self, index: int) -> str | None:
        """The peer the order handed this chunk out for (it had just served one here), if any."""
        with self.lock:
            return self.follow.pop(index, None)

    def settled(self, index: int) -> None:
        """The chunk left the peer source (fetched, or on to the sources): no longer in flight here."""
        with self.lock:
            if index in self.inflight:
                self.inflight.discard(index)
                self.lock.notify_all()

    def _share(self, pending: int) -> int | None:
        """The lowest pending chunk of this agent's origin share, its own or passed on to it (called
        with the lock held)."""
        now = time.monotonic()
        own = next(
            (
                i
                for i in range(self.slot, len(self.manifest), max(self.of, 1))
                if pending >> i & 1 and not self._known_holder(i)
            ),
            None,
        )
        passed = [
            i for i in self.lacking if pending >> i & 1 and self._owns(i, now) and not self._known_holder(i)
        ]
        return min([*passed, *([] if own is None else [own])], default=None)

    def _paced(self, index: int) -> bool:
        below = self.wanted & ((1 << index) - 1)
        return (below & ~(self.union.bits | self.have.bits)).bit_count() <= WINDOW
