"""The swarm's fetch order (agent.peer.pick, agent.peer.swarm): a thread takes a chunk only once a
peer not busy can give it (or it is the agent's paced origin share), rarest first; a chunk no peer
can serve now goes back to the order instead of holding a thread."""

from __future__ import annotations

import random
import threading
import time

import pytest

from agent.image.manifest import ChunkEntry, ChunkKind, Encoding, Manifest, Metadata
from agent.peer.bitmap import Have
from agent.peer.pick import choose, fallback, set_bits
from agent.peer.swarm import Swarm
from agent.writer.plan import Action, Step

MiB = 1 << 20
IMAGE = "ab" * 32


def manifest(n: int) -> Manifest:
    entries = [ChunkEntry(bytes([i]) * 32, ChunkKind.DATA, Encoding.RAW, MiB) for i in range(n)]
    return Manifest.build(n * MiB, MiB, Metadata("x", "1"), entries)


def bits(*indices: int) -> int:
    return sum(1 << i for i in indices)


@pytest.mark.parametrize(
    ("mask", "start", "limit", "expected"),
    [
        (bits(1, 4, 9), 0, 10, [1, 4, 9]),
        (bits(1, 4, 9), 5, 10, [9, 1, 4]),  # from `start` up, then wrapping round
        (bits(1, 4, 9), 4, 2, [4, 9]),
        (0, 3, 5, []),
    ],
)
def test_set_bits(mask: int, start: int, limit: int, expected: list[int]) -> None:
    assert set_bits(mask, start, limit) == expected


def test_the_ready_origin_share_comes_first() -> None:
    rng = random.Random(1)
    assert choose(bits(2, 3, 7), 7, [bits(2, 3)], [bits(2, 3)], rng, 8) == 7
    # a share chunk already fetched is no reason to pick it
    assert choose(bits(2, 3), 7, [bits(2)], [bits(2)], rng, 8) == 2


def test_only_chunks_a_free_peer_holds_are_ready() -> None:
    rng = random.Random(2)
    pending = bits(0, 1, 2, 3)
    # chunk 1 is held only by a busy peer (in `known`, not in `free`): not ready
    assert choose(pending, None, [bits(5)], [bits(5), bits(1)], rng, 8) is None
    assert {choose(pending, None, [bits(1, 3)], [bits(1, 3)], rng, 8) for _ in range(50)} == {1, 3}


def test_the_rarest_ready_chunk_is_taken_random_among_equals() -> None:
    rng = random.Random(3)
    known = [bits(0, 1, 2), bits(0, 1), bits(0, 2)]  # chunk 0: 3 holders, 1 and 2: 2 each
    picks = [choose(bits(0, 1, 2), None, known, known, rng, 3) for _ in range(200)]
    assert 0 not in picks
    assert 60 < picks.count(1) < 140, picks.count(1)


def test_fallback_gives_a_pending_chunk() -> None:
    rng = random.Random(4)
    assert {fallback(bits(3, 6), rng, 8) for _ in range(50)} == {3, 6}


def swarm_of(n: int, peers: dict[str, int], slot: int = 0, of: int = 4, patience: float = 30.0) -> Swarm:
    s = Swarm(manifest(n), IMAGE, "j-000000000001", lambda m: (_ for _ in ()).throw(RuntimeError()))
    s.slot, s.of, s.patience = slot, of, patience
    s.announces = 1  # as after an announce that worked: before one, the order hands out every chunk
    for url, held in peers.items():
        s.peers[url] = Have(n, held)
    return s


def fetch_steps(m: Manifest) -> list[Step]:
    return [Step(c, Action.FETCH) for c in m]


def test_the_order_waits_for_a_ready_chunk_instead_of_handing_out_one_nobody_holds() -> None:
    swarm = swarm_of(8, {"http://p1": bits(5)}, slot=1, of=4)
    swarm.parallel = 8  # what is held back here is held back for want of a holder, not of a slot
    order = swarm.order(iter(fetch_steps(swarm.manifest)))
    first = [next(order).chunk.index, next(order).chunk.index]
    assert first == [1, 5]  # its origin share (paced: nothing missing below it), then what p1 holds
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(next(order).chunk.index), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive(), f"handed out chunk {got} that no peer holds"
    with swarm.lock:
        swarm.peers["http://p1"].bits |= bits(6)  # an announce says p1 now holds chunk 6
        swarm.lock.notify_all()
    t.join(2)
    assert got == [6]


def test_a_busy_peer_s_chunks_are_not_ready_until_its_back_off_ends() -> None:
    swarm = swarm_of(4, {"http://p1": bits(2)}, slot=3, of=4)
    swarm.pending = bits(2)
    swarm.backoff("http://p1", 0.4)
    t0 = time.monotonic()
    swarm.parallel = 1
    assert swarm._next_ready() == 2
    assert time.monotonic() - t0 >= 0.35


def test_a_deferred_chunk_is_handed_out_again_and_the_order_ends_only_when_none_is_in_flight() -> None:
    swarm = swarm_of(3, {"http://p1": bits(0, 1, 2)}, slot=3, of=4)
    order = swarm.order(iter(fetch_steps(swarm.manifest)))
    taken = [next(order).chunk.index, next(order).chunk.index]  # parallel = 2: two at a time
    assert swarm.defer(taken[0])
    swarm.settled(taken[1])  # fetched
    (untaken,) = {0, 1, 2} - set(taken)
    again = next(order).chunk.index
    last = next(order).chunk.index
    assert {again, last} == {taken[0], untaken}
    ended: list[object] = []
    t = threading.Thread(target=lambda: ended.append(next(order, None)), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive(), "the order ended while chunks were still in flight (they may come back)"
    swarm.settled(again)
    swarm.settled(last)
    t.join(2)
    assert ended == [None]
    assert not swarm.defer(0), "a chunk not in flight is not taken back"


def test_a_halted_order_stops_waiting() -> None:
    swarm = swarm_of(
        4, {}, slot=5, of=8
    )  # no share of its own; nobody holds anything, and others are in the swarm
    order = swarm.order(iter(fetch_steps(swarm.manifest)))
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(next(order).chunk.index), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive()
    swarm.halt()  # the write was interrupted: any chunk, the fetch fails at once
    t.join(2)
    assert len(got) == 1


def test_a_stalled_swarm_hands_out_chunks_for_the_sources() -> None:
    swarm = swarm_of(4, {}, slot=5, of=8, patience=0.3)
    t0 = time.monotonic()
    order = swarm.order(iter(fetch_steps(swarm.manifest)))
    first = next(order).chunk.index
    assert 0.25 <= time.monotonic() - t0 < 3
    assert first in range(4)


def test_an_agent_s_first_chunks_are_announced_soon_later_ones_at_the_interval() -> None:
    from agent.peer.swarm import EARLY
    from agent.protocol import Announce, AnnounceReply, PeerGrant

    stamps: list[float] = []

    def announcer(message: Announce) -> AnnounceReply:
        stamps.append(time.monotonic())
        return AnnounceReply(PeerGrant(0, "00" * 32, "t", 1e11), interval=2.0)

    m = manifest(EARLY + 4)
    swarm = Swarm(m, IMAGE, "j-000000000001", announcer)
    swarm.interval = 2.0
    stop = threading.Event()
    t = threading.Thread(target=swarm.run, args=(stop, lambda _: None), daemon=True)
    start = time.monotonic()
    t.start()
    try:
        time.sleep(0.1)
        swarm.on_verified(m.chunk(0))
        time.sleep(0.9)
        assert len(stamps) == 1 and 0.4 <= stamps[0] - start < 0.9, [s - start for s in stamps]
        for i in range(1, EARLY + 1):
            swarm.have.add(i)  # held, without news: past the first EARLY, on_verified stays quiet
        swarm.on_verified(m.chunk(EARLY + 1))
        time.sleep(1.2)  # the next announce is due 2 s after the last
        assert len(stamps) == 1, [s - start for s in stamps]
        time.sleep(0.5)
        assert len(stamps) == 2
    finally:
        stop.set()
        swarm.news.set()
        t.join(3)
        assert not t.is_alive()


def test_a_share_chunk_the_swarm_already_holds_comes_from_a_peer() -> None:
    # shares move when agents leave: the new owner of a chunk others hold does not ask the origin
    swarm = swarm_of(8, {"http://p1": bits(5)}, slot=1, of=4)
    assert swarm.mine(5), "p1's claim alone: the tracker does not count it (nobody was served by p1)"
    swarm.union = Have(8, bits(5))  # ... now it does
    assert swarm.mine(1) and not swarm.mine(5)
    swarm.pending = bits(5)
    swarm.parallel = 4
    assert swarm._share(swarm.pending) is None
    assert swarm._next_ready() == 5  # ready because p1 holds it, not as a share
    swarm.drop("http://p1", "served bad bytes")
    assert swarm.mine(5)  # a dropped peer's claims count for nothing


def test_after_a_peer_served_a_chunk_the_next_is_one_it_holds_and_goes_to_it() -> None:
    # p1 holds the common chunks 0-3, p2 alone the rare 4-5 (and 0): the rarest ready chunk is one
    # of p2's, unless p1 has just served us (its slot is free now: p2's is likely busy)
    peers = {"http://p1": bits(0, 1, 2, 3), "http://p2": bits(0, 4, 5), "http://p3": bits(1, 2, 3)}
    swarm = swarm_of(8, peers, slot=7, of=8)
    swarm.parallel = 1
    order = swarm.order(iter(fetch_steps(swarm.manifest)))
    first = next(order).chunk.index
    assert first in (4, 5), "the rarest first"
    assert swarm.after(first) is None, "no peer to follow yet"
    swarm.served_by("http://p1", first)  # whatever served it: say p1 did
    swarm.settled(first)
    second = next(order).chunk.index
    assert second in (0, 1, 2, 3), f"one p1 holds, though { ({4, 5} - {first}) } is rarer: {second}"
    assert swarm.after(second) == "http://p1", "and the peer source asks p1 for it"
    assert swarm.after(second) is None, "said once"
    swarm.settled(second)
    third = next(order).chunk.index
    assert third == ({4, 5} - {first}).pop(), "nobody just served: the rarest again"


def test_a_peer_that_just_served_but_is_now_backed_off_is_not_followed() -> None:
    swarm = swarm_of(4, {"http://p1": bits(0, 1), "http://p2": bits(0, 1, 2)}, slot=7, of=8)
    swarm.parallel = 1
    order = swarm.order(iter(fetch_steps(swarm.manifest)))
    assert next(order).chunk.index == 2, "the rarest"
    swarm.served_by("http://p1", 0)
    swarm.backoff("http://p1", 30.0)  # it answered 503 to another thread meanwhile
    swarm.settled(2)
    second = next(order).chunk.index
    assert second in (0, 1) and swarm.after(second) is None, "asked of a free holder, p2"
