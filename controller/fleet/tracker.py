"""The tracker: which deploying agent holds which chunks of which image, and who should ask whom.

Kept in memory only (a restart forgets it; agents re-announce within one interval) and bounded: at
most `max_agents` holdings (10,000 by default) of at most two 8-KiB bitmaps each (its claims and its
vouches), the least recently seen evicted first, and a holding not renewed within `ttl` seconds
forgotten; and per swarm, for at most `max_agents` machines, which of their share claims counted
unvouched (one more bitmap of their share's chunks, two more while they count: `Claims`). One url is
one holding's: another agent announcing it is refused. Every announce is answered with:
- the image's fleet key for the current epoch and a fresh ticket for the caller (agent.peer.ticket),
- a few peers that hold chunks the caller lacks: completed ones first, random among equals,
  about ln N of them and at most 10,
- the caller's origin share: chunk i is the caller's to fetch from the sources when
  i % seed_of == seed_slot, so that the origin serves about one copy and peers the rest. seed_of
  counts the agents announced and, for `join_grace` seconds, the image's other running deploy
  jobs (`deploying`, the fleet's): agents join seconds apart, and shares sized by the first
  announces alone gave the first agents most of the image from the origin;
- which chunks someone in the swarm credibly holds (swarm_have), by which agents pace their origin
  shares and see the swarm move: the chunks of a holding that another agent said it served and that
  verified (`Announce.served`), and each chunk of its own origin share for `prove_within` seconds
  (up to twice that) from the announce that first claims it. An agent's claims cost nothing to make:
  one that claimed every chunk made the union whole at its first announce, so no agent paced its
  share, no chunk counted as lacking, the swarm never looked like it moved, and 54-72 of 100 agents
  went to the origin. (The union is OR-ed at each announce and again over the swarm when a claim
  runs out: bits counted under an older, smaller `seed_of` last until then.)
- the peers it removed from the swarm (shunned): an agent reports a peer whose bytes failed the
  manifest's digest in its next announce, and once `shun_after` agents have reported one, it is
  forgotten (its claims leave the union, its slot the shares) and its later announces get no peers,
  no slot in the shares and no place in others' answers: the agents that have not met it yet do
  not each spend a chunk's time on it, nor wait on its share.
Whether the caller may announce at all (a running deploy job for that image) is the fleet's
check, done before (Fleet.check_deploying).
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.peer.bitmap import Have
from agent.peer.errors import PeerError
from agent.peer.ticket import Ticket, encode, fleet_key
from agent.protocol import MAX_PEERS, Announce, AnnounceReply, PeerGrant, PeerInfo, ProtocolError
from controller.fleet.errors import Conflict


@dataclass(frozen=True)
class TrackerPolicy:
    max_agents: int = 10_000
    ttl: float = 30.0  # seconds a holding lives without an announce
    interval: float = 1.0  # seconds between an agent's announces (Config.announce_seconds)
    # announces per second the tracker is asked for at most, over every swarm: past max_rate x
    # interval agents, each is told to announce less often (10,000 agents: every 10 s), so an answer's
    # cost (about 0.3 ms at 10,000 holdings) stays a bounded share of the controller's one event loop.
    # ttl should stay above 3 x max_agents / max_rate: a holding outlives two missed announces
    max_rate: float = 1000.0
    epoch_seconds: float = 3600.0  # a fleet key's lifetime
    ticket_seconds: float = 600.0
    probes: int = 64  # holdings looked at per answer: the cost of an answer stays flat in N
    # seconds a running deploy job of an image keeps a slot in its origin shares before its agent
    # has announced: long enough for its manifest fetch and first announce, short enough that a
    # job whose agent never joins (one without sledge.peers=1) holds back its chunks only briefly
    join_grace: float = 5.0
    # distinct agents that must report a peer for bad bytes before it is shunned: one hostile agent
    # alone cannot remove an honest peer (two can: they cost the swarm that peer's uploads only)
    shun_after: int = 2
    # seconds an agent's claims to its own origin share count without another agent saying it was
    # served by it (at least 3 announce intervals): an honest owner is asked for its share's chunks
    # as soon as others learn of them, and serves one within a chunk's time; one that does not
    # (a claim it cannot back, a peer port nobody reaches) has its share passed on
    prove_within: float = 10.0


SHUNNED_KEPT = 64  # shunned machines remembered per swarm, the oldest forgotten first
SHUNNED_SAID = 16  # the newest of them named in each answer (the wire's bound on a list of urls)


@dataclass(frozen=True)
class Shun:
    """A machine removed from an image's swarm: agents got bytes from it that failed verification."""

    machine_id: str
    url: str
    digest: str
    reporters: tuple[str, ...]


@dataclass(frozen=True)
class SwarmCounts:
    """What the tracker holds now and has done since it started (the controller's /metrics)."""

    swarms: int  # images with at least one announcing agent
    agents: int  # agents holding a place in a swarm
    reports: int  # distinct (reporter, peer) reports of bytes that failed verification, ever
    shunned: int  # peers removed from a swarm on those reports, ever
    lapsed: int  # agents whose claim to their own share ran out with nothing vouched for, ever


@dataclass
class Holding:
    machine_id: str
    url: str
    have: Have
    complete: bool
    seen: float
    slot: int
    vouched: int = 0  # chunks another agent said it served that verified (a bitmap)
    lapsed: bool = False  # its share claim ran out before anyone vouched for any of its chunks


@dataclass
class Claims:
    """One machine's share claims that the union counts, or counted, unvouched. Each chunk counts
    once, from the announce that first claims it: those of a first claim until `ends` (now + the
    time to prove), those claimed while that window is open until one time to prove after it (so
    each for between one and two of them), and never again unvouched. Kept while the swarm lasts
    (leaving and announcing again does not make them new); what others vouched for leaves it (a
    chunk another agent got from the machine and verified may count again after a new announce:
    the machine held it), and an empty one is dropped, so an honest fleet's records stay small."""

    seen: int = 0  # every share chunk claimed that counts or counted unvouched (a bitmap)
    open: int = 0  # of those, the ones counting until `ends`
    after: int = 0  # and the ones counting until `ends` + the time to prove
    ends: float = -math.inf

    def count(self, mine: int, vouched: int, now: float, within: float) -> int:
        """The share claims `mine` (none of them `vouched`) that count at `now`, the new ones among
        them first given their window."""
        if now > self.ends:  # the open window ran out: the one after it opens
            self.open, self.after, self.ends = self.after, 0, self.ends + within
            if now > self.ends:  # ... and ran out too
                self.open = 0
        if self.seen & vouched:
            self.seen &= ~vouched
        new = mine & ~self.seen
        if new:
            self.seen = self.seen | new if self.seen else new  # one 8-KiB int, not two, at first
            if self.open:
                self.after |= new
            else:
                self.open, self.ends = new, now + within
        return mine & (self.open | self.after)

    def empty(self) -> bool:
        return not self.seen


@dataclass
class Expected:
    """One image's running deploy jobs as the fleet last said, and which of their machines have not
    announced yet while their grace runs (first counted first: expired ones leave from the front)."""

    machines: frozenset[str]
    first: dict[str, float]  # machine -> when the tracker first counted its job
    pending: OrderedDict[str, None]


# manifest digest -> machines running a deploy job of it (controller.fleet.agents.Fleet.deploying)
Deploying = Callable[[], Mapping[str, frozenset[str]]]
NONE: frozenset[str] = frozenset()


def peer_count(n: int) -> int:
    """About ln N peers for a swarm of N, at least 4, at most MAX_PEERS."""
    return max(4, min(MAX_PEERS, math.ceil(2 * math.log(max(n, 1)))))


def share_mask(slot: int, of: int, count: int) -> int:
    """The chunks of an origin share: i % of == slot, below count (O(log(count / of)) big-int steps)."""
    of = max(of, 1)
    if slot >= min(of, count):
        return 0
    mask, width = 1, of
    while width < count:
        mask |= mask << width
        width *= 2
    return (mask << slot) & ((1 << count) - 1)


def _bound(kept: dict[str, Any], most: int) -> None:
    """Forget the oldest entries (insertion order) past `most`."""
    while len(kept) > most:
        del kept[next(iter(kept))]


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Tracker:
    def __init__(
        self,
        policy: TrackerPolicy = TrackerPolicy(),
        secret: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        deploying: Deploying | None = None,
        on_shun: Callable[[Shun], None] = lambda _: None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.secret = secret or secrets.token_bytes(32)  # a restart re-keys: agents get new keys
        # and names them anew, so a peer told of them later says "key unknown", not "forged"
        self.kid = secrets.token_hex(4)
        # `clock` times what the tracker itself waits for (a holding's ttl, join_grace, prove_within):
        # a step of the wall clock must not keep a silent agent for an hour; `wall` is the time a
        # ticket's expiry and the agents' clock offset are told in
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.swarms: dict[str, dict[str, Holding]] = {}  # digest -> machine -> holding
        # digest -> its holdings' machines by slot: a holding that leaves gives its slot to the last
        # one (one share changes, not every share above it), in O(1)
        self.slots: dict[str, list[str]] = {}
        self.where: dict[str, str] = {}  # machine -> the digest it announced last
        self.lru: OrderedDict[str, None] = OrderedDict()  # machines, least recently seen first
        self.union: dict[str, int] = {}  # digest -> OR of its holdings' bitmaps
        # the fleet's running deploy jobs, re-read at most once an interval (a store read of every
        # running job: not per announce), and sooner when an agent announces that it did not list
        self.deploying = deploying
        self.running: Mapping[str, frozenset[str]] = {}
        self.read_at = -math.inf
        self.expected: dict[str, Expected] = {}  # digest -> its jobs whose agents may still join
        self.at: dict[str, dict[str, str]] = {}  # digest -> url -> the machine serving there
        self.reports: dict[str, dict[str, set[str]]] = {}  # digest -> accused machine -> reporters
        self.shunned: dict[str, OrderedDict[str, str]] = {}  # digest -> machine -> its url, newest last
        self.on_shun = on_shun
        # digest -> when the first unproven claim it counts runs out: its union is OR-ed again then
        self.lapse: dict[str, float] = {}
        # holdings whose share claim ran out before any agent was served a chunk by them, ever
        # (honest ones rarely: their share's chunks are asked for first)
        self.lapsed = 0
        self.reported = 0  # distinct (reporter, accused) pairs counted, ever
        self.shuns = 0  # machines shunned, ever
        # digest -> machine -> its share claims that count or counted unvouched. Kept, like the
        # reports, while the swarm lasts (up to max_agents machines each, the oldest forgotten
        # first): leaving and announcing again must not start a peer's time or its record afresh
        self.claims: dict[str, dict[str, Claims]] = {}

    def __len__(self) -> int:
        return len(self.where)

    def counts(self) -> SwarmCounts:
        return SwarmCounts(len(self.swarms), len(self.where), self.reported, self.shuns, self.lapsed)

    def interval(self, empty: bool = False) -> float:
        """Seconds an agent is told to wait between announces: the configured interval, longer once
        the agents held would announce more than max_rate times a second. An agent that holds
        nothing yet is told a quarter of it (within the same bound): it learns of new holders sooner,
        and a young swarm spreads each chunk one hop per announce it waits for."""
        base = self.policy.interval / 4 if empty else self.policy.interval
        return max(base, len(self.where) / self.policy.max_rate)

    def grant(self, machine_id: str, digest: str) -> PeerGrant:
        now = self.wall()
        # sign with epoch E until E + 1 is one announce interval old: by then every agent that
        # announced has E + 1's key (each grant carries the next key ahead of time)
        epoch = int((now - self.interval()) // self.policy.epoch_seconds)
        key = fleet_key(self.secret, digest, epoch)
        expires = int(now + self.policy.ticket_seconds)
        text = encode(Ticket(digest, machine_id, epoch, expires, self.kid), key)
        following = fleet_key(self.secret, digest, epoch + 1)
        return PeerGrant(epoch, key.hex(), text, float(expires), self.kid, following.hex(), now)

    def announce(self, machine_id: str, host: str, message: Announce) -> AnnounceReply:
        """Record what the caller holds (it serves at host:port) and answer with peers and a grant."""
        now = self.clock()
        digest = message.manifest_digest
        try:
            have = Have.decode(message.have, message.chunks)
        except PeerError as exc:
            raise ProtocolError("have", f"a bitmap of {message.chunks} chunks", str(exc)) from None
        vouches = []  # read whole before anything changes: a bad one refuses the announce
        for i, vouch in enumerate(message.served):
            try:
                vouches.append((vouch.url, Have.decode(vouch.have, message.chunks).bits))
            except PeerError as exc:
                raise ProtocolError(
                    f"served[{i}].have", f"a bitmap of {message.chunks} chunks", str(exc)
                ) from None
        self._expire(now)
        url = url_of(host, message.port)
        owner = self.at.get(digest, {}).get(url)
        if owner is not None and owner != machine_id and not message.leaving:
            if now - self.swarms[digest][owner].seen > 3 * self.interval():
                # silent for three intervals: gone (a machine enrolled anew at the same address and
                # port), not serving there anyway
                self._forget(owner)
            else:
                # two agents at one address and port: behind a NAT, or a proxy not named with
                # --trusted-proxy; or one agent naming another's port to take its place in the
                # index (its vouches, its reports, the answers that name it)
                raise Conflict(
                    f"peer url {url}: already announced by machine {owner} for this image; expected each"
                    " agent at an address and port of its own (agents behind one NAT, or a proxy not"
                    " named with --trusted-proxy, share the address)"
                )
        if message.leaving:
            if self.where.get(machine_id) == digest:
                if message.bad:  # its last fetch may have met a bad peer
                    self._report(digest, machine_id, message.bad)
                self._forget(machine_id)
            return AnnounceReply(self.grant(machine_id, digest), interval=self.interval())
        previous = self.where.get(machine_id)
        if previous is not None and previous != digest:
            self._forget(machine_id)
        shunned = self.shunned.get(digest)
        if shunned is not None and machine_id in shunned:
            # its deploy goes on from its own sources: it owns every chunk, knows no peer, and
            # nobody is told of it
            return AnnounceReply(
                self.grant(machine_id, digest),
                seed_slot=0,
                seed_of=1,
                interval=self.interval(),
                swarm_have=Have(have.count, self.union.get(digest, 0)).encode(),
                shunned=self._said(digest),
            )
        if machine_id not in self.swarms.get(digest, {}):
            # room first: evicting a swarm's only holding removes the swarm (taken after this)
            while len(self.where) >= self.policy.max_agents:
                self._forget(next(iter(self.lru)))
        swarm = self.swarms.setdefault(digest, {})
        holding = swarm.get(machine_id)
        if holding is None:
            slots = self.slots.setdefault(digest, [])
            holding = Holding(machine_id, "", have, False, now, len(slots))
            slots.append(machine_id)
            swarm[machine_id] = holding
            self.where[machine_id] = digest
        if holding.url != url:
            at = self.at.setdefault(digest, {})
            if at.get(holding.url) == machine_id:
                del at[holding.url]
            at[url] = machine_id
            holding.url = url
        holding.have, holding.complete, holding.seen = have, message.complete, now
        self.lru[machine_id] = None
        self.lru.move_to_end(machine_id)
        if vouches:
            self._vouch(digest, machine_id, vouches)
        if message.bad:
            self._report(digest, machine_id, message.bad)  # a peer shunned: the shares close up
        # the slots past the announced agents' are the joining ones': nobody fetches their chunks
        # from the origin until they join or their grace ends (then shares close up)
        of = len(swarm) + self._vacant(digest, swarm, machine_id, now)
        if now >= self.lapse.get(digest, math.inf):
            self._rebuild(digest, now)  # claims whose time to be proven ran out leave the union
        else:
            self.union[digest] = self.union.get(digest, 0) | self._credible(digest, holding, of, now)
        peers = self._peers(swarm, holding)
        return AnnounceReply(
            self.grant(machine_id, digest),
            tuple(PeerInfo(h.machine_id, h.url, h.have.encode(), h.complete) for h in peers),
            seed_slot=holding.slot,
            seed_of=of,
            interval=self.interval(empty=not have.bits),
            swarm_have=Have(have.count, self.union[digest]).encode(),
            shunned=self._said(digest),
        )

    def _credible(self, digest: str, h: Holding, of: int, now: float) -> int:
        """What of a holding's bitmap the union counts: the chunks others vouched for, and each of
        its own share's chunks for `prove_within` (up to twice that) from the announce that first
        claimed it. A window from its first share claim alone left an owner's later share chunks
        out of the union until someone vouched for them, which nobody did while the union said
        nobody held them: their next slot fetched them from the origin again (at 64 chunks and
        N = 10, 9-15 chunks sent twice)."""
        vouched = h.vouched & h.have.bits
        mine = h.have.bits & share_mask(h.slot, of, h.have.count) & ~vouched
        kept = self.claims.get(digest, {})
        claims = kept.get(h.machine_id)
        if claims is None:
            if not mine:
                return vouched
            kept = self.claims.setdefault(digest, kept)
            claims = kept[h.machine_id] = Claims()
            _bound(kept, self.policy.max_agents)
        counted = claims.count(mine, h.vouched, now, max(self.policy.prove_within, 3 * self.interval()))
        if claims.empty():
            del kept[h.machine_id]  # every chunk it counted unvouched is vouched for now
        if mine & ~counted and not h.lapsed and not h.vouched:
            h.lapsed = True
            self.lapsed += 1
        if counted:
            self.lapse[digest] = min(self.lapse.get(digest, math.inf), claims.ends)
        return vouched | counted

    def _vouch(self, digest: str, reporter: str, vouches: list[tuple[str, int]]) -> None:
        """The reporter got these chunks from the peers at these urls, and they verified: those
        claims count (only those: a peer that served one real chunk does not make the rest true)."""
        at, swarm = self.at.get(digest, {}), self.swarms[digest]
        for url, bits in vouches:
            machine_id = at.get(url)
            holding = swarm.get(machine_id) if machine_id is not None and machine_id != reporter else None
            if holding is None or holding.have.count != swarm[reporter].have.count:
                continue
            # kept whole (the peer may have served a chunk before its announce says it holds it), and
            # counted only where the peer claims the chunk: one agent vouching every chunk of a peer
            # that holds none made the union whole, as a liar's claims once did
            holding.vouched |= bits
            self.union[digest] = self.union.get(digest, 0) | (bits & holding.have.bits)

    def _report(self, digest: str, reporter: str, urls: tuple[str, ...]) -> None:
        """The reporter got bytes that failed verification from the peers at these urls."""
        at = self.at.get(digest, {})
        accused = self.reports.setdefault(digest, {})
        for url in urls:
            machine_id = at.get(url)
            if machine_id is None or machine_id == reporter:
                continue  # gone, shunned already, or not of this swarm
            reporters = accused.setdefault(machine_id, set())
            _bound(accused, self.policy.max_agents)
            if reporter not in reporters:
                reporters.add(reporter)
                self.reported += 1
            if len(reporters) >= self.policy.shun_after:
                self._shun(digest, machine_id, url, tuple(sorted(reporters)))

    def _shun(self, digest: str, machine_id: str, url: str, reporters: tuple[str, ...]) -> None:
        shunned = self.shunned.setdefault(digest, OrderedDict())
        shunned[machine_id] = url
        _bound(shunned, SHUNNED_KEPT)
        self.reports[digest].pop(machine_id, None)
        self.shuns += 1
        self._forget(machine_id)  # its claims leave the union at once (shuns are rare), its slot the shares
        self._rebuild(digest)
        self.on_shun(Shun(machine_id, url, digest, reporters))

    def _said(self, digest: str) -> tuple[str, ...]:
        shunned = self.shunned.get(digest)
        return tuple(shunned.values())[-SHUNNED_SAID:] if shunned else ()

    def _vacant(self, digest: str, swarm: dict[str, Holding], machine_id: str, now: float) -> int:
        """Slots kept for the image's running deploy jobs whose agents have not announced yet, each
        for `join_grace` seconds after the tracker first counted it. Amortised O(1) an announce:
        O(jobs) only when the fleet's list was read again."""
        if self.deploying is None:
            return 0
        stale = now - self.read_at
        if stale >= self.interval() or (
            machine_id not in self.running.get(digest, NONE) and stale >= self.interval() / 4
        ):
            self.running, self.read_at = self.deploying(), now
        machines = self.running.get(digest, NONE)
        expected = self.expected.get(digest)
        if expected is None or expected.machines is not machines:
            old = expected.first if expected is not None else {}
            first = {m: old.get(m, now) for m in machines}
            waiting = sorted(
                (m for m in machines if m not in swarm and now - first[m] < self.policy.join_grace),
                key=first.__getitem__,
            )
            expected = self.expected[digest] = Expected(machines, first, OrderedDict.fromkeys(waiting))
        expected.pending.pop(machine_id, None)  # it has joined
        pending = expected.pending
        while pending and now - expected.first[next(iter(pending))] >= self.policy.join_grace:
            pending.popitem(last=False)
        return len(pending)

    def _peers(self, swarm: dict[str, Holding], me: Holding) -> list[Holding]:
        members = list(swarm.values())
        probes = self.rng.sample(members, min(len(members), self.policy.probes))
        lacking = ~me.have.bits
        useful = [
            h
            for h in probes
            if h is not me and h.url != me.url and h.have.count == me.have.count and h.have.bits & lacking
        ]
        self.rng.shuffle(useful)
        # stable: completed first (and vouched for: a claim to be complete costs nothing), random among
        # equals
        useful.sort(key=lambda h: not (h.complete and h.vouched))
        return useful[: peer_count(len(swarm))]

    def _forget(self, machine_id: str) -> str | None:
        """Drop one holding, in O(1): the last slot's holding takes its slot (one share changes), and
        its swarm's union is OR-ed again within an interval (at once if it was the last holding).
        A pass over the swarm at each leave cost O(N) an announce: 10,000 agents leaving at the end
        of a deploy held the event loop for 72 s, and an agent looping leave and join cost 60-200
        ordinary announces each."""
        digest = self.where.pop(machine_id, None)
        self.lru.pop(machine_id, None)
        if digest is None:
            return None
        swarm = self.swarms.get(digest, {})
        gone = swarm.pop(machine_id, None)
        at = self.at.get(digest, {})
        if gone is not None:
            if at.get(gone.url) == machine_id:
                del at[gone.url]
            slots = self.slots[digest]
            last = slots.pop()
            if last != machine_id:
                slots[gone.slot] = last
                swarm[last].slot = gone.slot
        if not swarm:
            self._rebuild(digest)  # the swarm's state goes with it
        else:
            soon = self.clock() + self.interval()
            self.lapse[digest] = min(self.lapse.get(digest, math.inf), soon)
        return digest

    def _rebuild(self, digest: str, now: float | None = None) -> None:
        """The union OR-ed again (one pass over the swarm), or the swarm's state gone with it."""
        swarm = self.swarms.get(digest)
        if not swarm:
            self.swarms.pop(digest, None)
            self.slots.pop(digest, None)
            self.union.pop(digest, None)
            self.expected.pop(digest, None)
            self.at.pop(digest, None)
            self.reports.pop(digest, None)
            self.shunned.pop(digest, None)  # nobody is left to be told of them
            self.lapse.pop(digest, None)
            self.claims.pop(digest, None)
            return
        now = self.clock() if now is None else now
        expected = self.expected.get(digest)
        of = len(swarm) + (len(expected.pending) if expected is not None else 0)
        union = 0
        self.lapse.pop(digest, None)  # set again by the claims that still count unproven
        for h in swarm.values():
            union |= self._credible(digest, h, of, now)
        self.union[digest] = union
        if digest in self.lapse:  # at most one pass an interval, however the claims' ends are spread
            self.lapse[digest] = max(self.lapse[digest], now + self.interval())

    def _expire(self, now: float) -> None:
        # every expired holding first, then each swarm it left rebuilt once: expiring k agents of a
        # swarm of N costs O(k + N), not O(k * N) (10,000 at once blocked the event loop for seconds)
        touched: set[str] = set()
        while self.lru:
            oldest = next(iter(self.lru))
            digest = self.where[oldest]
            if now - self.swarms[digest][oldest].seen <= self.policy.ttl:
                break
            self._forget(oldest)
            touched.add(digest)
        for digest in touched:
            self._rebuild(digest)
