"""The tracker (controller.fleet.tracker): peer choice, origin shares, grants, bounded state."""

from __future__ import annotations

import math
import random
import time

from agent.peer import ticket
from agent.peer.bitmap import Have
from agent.peer.errors import KeyUnknown
from agent.peer.swarm import remember_keys
from agent.protocol import Announce, PeerGrant, Served
from controller.fleet.tracker import SwarmCounts, Tracker, TrackerPolicy, peer_count

IMAGE = "ab" * 32
OTHER = "cd" * 32
CHUNKS = 16


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def mid(i: int) -> str:
    return f"m-{i:012x}"


def bits(*held: int, n: int = CHUNKS) -> str:
    have = Have(n)
    for i in held:
        have.add(i)
    return have.encode()


def url(i: int) -> str:
    return f"http://127.0.0.1:{7000 + i}"


def announce(  # type: ignore[no-untyped-def]
    t: Tracker,
    i: int,
    held: tuple[int, ...] = (),
    digest: str = IMAGE,
    complete: bool = False,
    served: dict[int, tuple[int, ...]] | None = None,
):
    """Agent i announces what it holds; `served`: agent -> the chunks it served i that verified."""
    vouches = tuple(Served(url(j), bits(*chunks)) for j, chunks in (served or {}).items())
    message = Announce(f"j-{i:012x}", digest, 7000 + i, CHUNKS, bits(*held), complete, served=vouches)
    return t.announce(mid(i), "127.0.0.1", message)


def passes_of(t: Tracker) -> list[str]:
    """The swarms `t` makes a pass over from now on, one entry a pass."""
    rebuild = t._rebuild
    passes: list[str] = []

    def counted(digest: str, now: float | None = None) -> None:
        passes.append(digest)
        rebuild(digest, now)

    t._rebuild = counted  # type: ignore[method-assign]
    return passes


def test_peers_hold_what_the_caller_lacks_completed_first() -> None:
    t = Tracker(rng=random.Random(1))
    announce(t, 1, tuple(range(CHUNKS)), complete=True)
    announce(t, 2, (0, 1))
    announce(t, 3, (5,))
    announce(t, 4, (), served={1: (3,)})  # holds nothing: useless to anyone; 1 served it chunk 3
    reply = announce(t, 5, (0, 1))
    ids = [p.machine_id for p in reply.peers]
    assert ids[0] == mid(1), "the completed peer comes first (another agent vouched for it)"
    assert set(ids) == {mid(1), mid(3)}, "peer 2 holds nothing peer 5 lacks, peer 4 nothing at all"
    assert reply.peers[0].url == "http://127.0.0.1:7001" and reply.peers[0].complete


def test_about_ln_n_peers_at_most_ten_and_shares_cover_every_chunk_once() -> None:
    t = Tracker(rng=random.Random(2))
    for i in range(200):
        announce(t, i, (i % CHUNKS,))
    reply = announce(t, 999, ())
    assert len(reply.peers) == peer_count(201) == 10
    assert peer_count(25) == math.ceil(2 * math.log(25)) == 7
    shares = [announce(t, i, (i % CHUNKS,)) for i in range(200)]
    owners = {c: [i for i, r in enumerate(shares) if c % r.seed_of == r.seed_slot] for c in range(CHUNKS)}
    assert all(len(v) == 1 for v in owners.values()), owners


def test_shares_close_up_when_an_agent_goes_silent() -> None:
    clock = Clock()
    t = Tracker(TrackerPolicy(ttl=10.0), clock=clock)
    for i in range(3):
        announce(t, i)
    clock.now += 6
    announce(t, 0)
    announce(t, 2)
    clock.now += 6  # agent 1 last seen 12 s ago
    a, c = announce(t, 0), announce(t, 2)
    assert (a.seed_slot, a.seed_of, c.seed_slot, c.seed_of) == (0, 2, 1, 2)
    assert len(t) == 2


def test_state_is_bounded_least_recently_seen_first() -> None:
    clock = Clock()
    t = Tracker(TrackerPolicy(max_agents=100), clock=clock)
    for i in range(250):
        clock.now += 0.01
        announce(t, i, (1,), digest=IMAGE if i % 2 else OTHER)
    assert len(t) == 100
    assert sum(len(s) for s in t.swarms.values()) == 100
    assert set(t.where) == {mid(i) for i in range(150, 250)}


def test_an_agent_moving_to_another_image_leaves_the_first_swarm() -> None:
    t = Tracker()
    announce(t, 1, (1,), digest=IMAGE)
    announce(t, 1, (1,), digest=OTHER)
    assert IMAGE not in t.swarms and list(t.swarms[OTHER]) == [mid(1)]


def test_the_grant_verifies_with_its_key_for_its_image_and_holder_only() -> None:
    clock = Clock()
    t = Tracker(clock=clock, wall=clock)
    grant = announce(t, 1).grant
    keys = {ticket.key_name(grant.kid, grant.epoch): bytes.fromhex(grant.key)}
    got = ticket.verify(grant.ticket, keys, IMAGE, now=clock.now)
    assert got.holder == mid(1) and got.expires == grant.expires
    other = announce(t, 2, digest=OTHER).grant
    assert other.key != grant.key, "a key admits to one image only"
    clock.now += 601
    try:
        ticket.verify(grant.ticket, keys, IMAGE, now=clock.now)
        raise AssertionError("an expired ticket verified")
    except ticket.TicketInvalid:
        pass


async def test_only_a_running_deploy_of_that_image_may_announce(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_controller_kit import add_image, start

    h = await start(aiohttp_client, tmp_path, announce_seconds=0.75)
    digest = add_image(h.config.store_dir, "tiny", "1")
    machine = await h.enroll("52:54:00:00:00:41")
    other = await h.enroll("52:54:00:00:00:42")
    await h.client.post("/v1/images", json={"ref": "tiny:1"}, headers=h.op)

    async def announce(who: str, job_id: str, image: str, chunks: int = 1) -> tuple[int, dict]:  # type: ignore[type-arg]
        body = {"job_id": job_id, "manifest_digest": image, "port": 7000, "chunks": chunks, "have": ""}
        r = await h.client.post("/v1/agent/peers", json=body, headers=h.agent(who))
        return r.status, await r.json()

    r = await h.client.post(
        "/v1/jobs", json={"machine": machine, "kind": "deploy", "image": "tiny"}, headers=h.op
    )
    job = (await r.json())["id"]
    status, body = await announce(machine, job, digest)
    assert status == 409 and "expected a running deploy job, got a queued deploy job" in body["error"]
    await h.client.get("/v1/agent/jobs/next?wait=0", headers=h.agent(machine))
    status, body = await announce(machine, job, OTHER)
    assert status == 409 and f"deploys manifest {digest[:16]}, not {OTHER[:16]}" in body["error"]
    status, body = await announce(other, job, digest)
    assert status == 404, "another machine's job is no job at all"
    # a bitmap of more chunks than the image has: the tracker would hand it out as a holder of them
    status, body = await announce(machine, job, digest, chunks=4096)
    assert status == 400 and "announced a bitmap of 4096 chunks, expected 1" in body["error"], body
    status, body = await announce(machine, job, digest)
    assert status == 200 and body["grant"]["ticket"].startswith(f"t2.{digest}.{machine}.")
    assert body["interval"] == 0.75 / 4, (
        "an agent that holds nothing announces 4x as often as the config says"
    )
    r = await h.client.post("/v1/agent/peers", json={"job_id": job}, headers=h.agent(machine))
    assert r.status == 400


def test_a_leaving_agent_is_forgotten_at_once_and_its_share_passes_on() -> None:
    clock = Clock()
    t = Tracker(TrackerPolicy(interval=1.0), clock=clock)
    for i in range(4):
        announce(t, i, (i,), served={j: (j,) for j in range(i)})  # each vouches for the ones before
    t.announce(mid(1), "127.0.0.1", Announce("j-000000000001", IMAGE, 7001, CHUNKS, bits(1), leaving=True))
    assert mid(1) not in t.where
    c, d = announce(t, 2, (2,)), announce(t, 3, (3,))
    assert (d.seed_of, d.seed_slot, c.seed_slot) == (3, 1, 2), "the last slot's agent took the leaver's"
    assert Have.decode(d.swarm_have, CHUNKS).bits == 0b1111, "the union is OR-ed again within an interval"
    clock.now += 1.01
    a = announce(t, 0, (0,), served={3: (3,)})
    assert Have.decode(a.swarm_have, CHUNKS).bits == 0b1101, "the union forgot what the leaver held"


def test_expiring_thousands_at_once_rebuilds_each_swarm_once() -> None:
    # the holdings' bitmaps are 8 KiB each (65,536 chunks): rebuilding the union per expired holding
    # made one announce after 3,000 expiries take seconds on the event loop (10,000: over a minute)
    clock = Clock()
    t = Tracker(TrackerPolicy(ttl=30.0), clock=clock)
    n, chunks = 3000, 1 << 16
    full = Have(chunks)
    full.bits = (1 << chunks) - 1
    for i in range(n):
        t.announce(mid(i), "127.0.0.1", Announce(f"j-{i:012x}", IMAGE, 9 + i, chunks, full.encode()))
    clock.now += 20
    survivor = Have(chunks)
    survivor.add(5)
    for i in (n, n + 1):  # two agents that stay: the union and the shares are theirs afterwards
        t.announce(mid(i), "127.0.0.1", Announce(f"j-{i:012x}", IMAGE, 9 + i, chunks, survivor.encode()))
    clock.now += 15
    t0 = time.perf_counter()
    reply = t.announce(mid(n), "127.0.0.1", Announce(f"j-{n:012x}", IMAGE, 9 + n, chunks, survivor.encode()))
    took = time.perf_counter() - t0
    assert took < 1.0, f"one announce after {n} expiries took {took:.2f} s, expected under 1 s"
    assert len(t) == 2 and reply.seed_of == 2
    assert sorted(h.slot for h in t.swarms[IMAGE].values()) == [0, 1]
    assert Have.decode(reply.swarm_have, chunks).bits == 1 << 5


def agent_keys(*grants: PeerGrant) -> dict[str, bytes]:
    """An agent's key table after announces that got these grants."""
    keys: dict[str, bytes] = {}
    for g in grants:
        remember_keys(keys, g)
    return keys


def test_tickets_signed_across_an_epoch_boundary_verify_at_peers_that_announced_before_it() -> None:
    clock = Clock()
    clock.now = 3600.0 * 1000 - 1.0
    t = Tracker(TrackerPolicy(interval=2.0), clock=clock)
    b_keys = agent_keys(announce(t, 2).grant)  # B announced 1 s before the epoch ends
    for step in (0.5, 1.5, 2.0, 30.0, 3000.0):  # A announces after it, up to most of an epoch later
        clock.now = 3600.0 * 1000 + step
        a = announce(t, 1).grant
        assert ticket.verify(a.ticket, b_keys, IMAGE, now=clock.now).holder == mid(1), step


def test_a_restarted_controller_s_tickets_are_key_unknown_not_forged_until_the_next_announce() -> None:
    clock = Clock()
    before, after = Tracker(clock=clock), Tracker(clock=clock)  # same epoch, a new secret
    assert before.kid != after.kid
    b_keys = agent_keys(announce(before, 2).grant)
    a = announce(after, 1).grant
    try:
        ticket.verify(a.ticket, b_keys, IMAGE, now=clock.now)
        raise AssertionError("a ticket under a key B was never handed verified")
    except KeyUnknown as exc:
        assert after.kid in str(exc)
    b_keys = agent_keys(announce(before, 2).grant, announce(after, 2).grant)  # B re-announces
    assert ticket.verify(a.ticket, b_keys, IMAGE, now=clock.now).holder == mid(1)


def test_past_max_rate_agents_are_told_to_announce_less_often() -> None:
    t = Tracker(TrackerPolicy(interval=1.0, max_rate=50.0))
    for i in range(50):
        assert announce(t, i, (0,)).interval == 1.0, f"agent {i}: 50 agents at 1 s are 50 announces a second"
    assert announce(t, 50, (0,)).interval == 51 / 50
    for i in range(51, 200):
        announce(t, i, (0,))
    reply = announce(t, 0, (0,))
    assert reply.interval == 4.0, "200 agents at most 50 announces a second: every 4 s"
    assert len(t) / reply.interval <= 50.0
    assert announce(t, 7).interval == 4.0, "one that holds nothing is hurried only within the same bound"
    t.announce(mid(0), "127.0.0.1", Announce("j-000000000000", IMAGE, 7000, CHUNKS, bits(), leaving=True))
    assert announce(t, 1, (0,)).interval == 199 / 50, "agents that left no longer count"


def test_an_agent_that_holds_nothing_announces_four_times_as_often() -> None:
    t = Tracker(TrackerPolicy(interval=1.0, max_rate=50.0))
    assert announce(t, 1).interval == 0.25, "it learns of new holders 4x sooner"
    assert announce(t, 1, (3,)).interval == 1.0, "once it holds a chunk, the configured interval"
    for i in range(2, 41):
        announce(t, i, (0,))
    assert announce(t, 1).interval == 40 / 50, "40 agents: past max_rate at a quarter of the interval"


class Deploying:
    """The fleet's running deploy jobs, as Fleet.deploying answers: counts its reads."""

    def __init__(self, machines: dict[str, set[int]]) -> None:
        self.machines = machines
        self.reads = 0

    def __call__(self) -> dict[str, frozenset[str]]:
        self.reads += 1
        return {digest: frozenset(mid(i) for i in ids) for digest, ids in self.machines.items()}


def owners(replies: list) -> dict[int, list[int]]:  # type: ignore[type-arg]
    """Chunk -> the indices of the replies whose origin share holds it."""
    return {c: [i for i, r in enumerate(replies) if c % r.seed_of == r.seed_slot] for c in range(CHUNKS)}


def test_shares_are_sized_by_the_running_deploy_jobs_not_by_the_agents_announced_so_far() -> None:
    clock = Clock()
    fleet = Deploying({IMAGE: set(range(10)), OTHER: {50, 51}})
    t = Tracker(clock=clock, deploying=fleet)
    first = announce(t, 0)
    # alone in the swarm, but nine more jobs of the image run: a tenth of the image is its share
    assert (first.seed_slot, first.seed_of) == (0, 10)
    replies = [first]
    for i in range(1, 10):
        clock.now += 0.3  # agents join as their jobs start, seconds apart in all
        replies.append(announce(t, i))
    assert [r.seed_slot for r in replies] == list(range(10))
    assert {r.seed_of for r in replies} == {10}, "a joining agent takes a kept slot: no share moves"
    assert all(len(v) == 1 for v in owners(replies).values()), "every chunk is exactly one agent's"
    assert announce(t, 50, digest=OTHER).seed_of == 2, "another image's jobs are another swarm's"


def test_a_job_whose_agent_never_announces_keeps_its_slot_for_the_grace_only() -> None:
    clock = Clock()
    t = Tracker(TrackerPolicy(join_grace=5.0), clock=clock, deploying=Deploying({IMAGE: {0, 1, 2}}))
    a = announce(t, 0)
    clock.now += 1
    b = announce(t, 1)
    assert (a.seed_of, b.seed_of, b.seed_slot) == (3, 3, 1), "job 2's agent may still come"
    assert not any(c % 3 == 2 for c in range(CHUNKS) if c % a.seed_of in (a.seed_slot, b.seed_slot))
    clock.now += 4.5  # 5.5 s after the tracker first counted job 2: its agent (no peers?) is not waited for
    replies = [announce(t, 0), announce(t, 1)]
    assert [(r.seed_slot, r.seed_of) for r in replies] == [(0, 2), (1, 2)]
    assert all(len(v) == 1 for v in owners(replies).values()), "its chunks are fetched by the others"
    late = announce(t, 2)  # it joins after all: a slot of its own, as any newcomer
    assert (late.seed_slot, late.seed_of) == (2, 3)


def test_the_fleet_is_read_once_an_interval_and_sooner_for_a_job_it_did_not_list() -> None:
    clock = Clock()
    fleet = Deploying({IMAGE: {0, 1}})
    t = Tracker(TrackerPolicy(interval=1.0), clock=clock, deploying=fleet)
    for i in range(2):
        announce(t, i)
    for _ in range(5):  # announces of agents it listed: the list is not read again within an interval
        clock.now += 0.04
        announce(t, 0)
    assert fleet.reads == 1
    fleet.machines[IMAGE] |= {2, 3}  # two more jobs started
    clock.now += 0.02
    assert announce(t, 2).seed_of == 3, "not read again within a quarter interval, even for a newcomer"
    assert fleet.reads == 1
    clock.now += 0.1
    reply = announce(t, 3)
    assert fleet.reads == 2 and reply.seed_of == 4
    clock.now += 1.0
    announce(t, 0)
    assert fleet.reads == 3, "and once an interval in any case"
    del fleet.machines[IMAGE]  # the jobs ended: nothing is kept for them
    clock.now += 1.0
    announce(t, 0)
    assert t.expected[IMAGE].machines == frozenset()
    for i in range(4):
        t.announce(mid(i), "127.0.0.1", Announce(f"j-{i:012x}", IMAGE, 7000, CHUNKS, bits(), leaving=True))
    assert IMAGE not in t.expected, "an image's expectation goes with its swarm"


async def test_the_controller_keeps_slots_for_its_running_deploy_jobs(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_controller_kit import add_image, start

    h = await start(aiohttp_client, tmp_path)
    digest = add_image(h.config.store_dir, "tiny", "1")
    machines = [await h.enroll(f"52:54:00:00:00:5{i}") for i in range(3)]
    await h.client.post("/v1/images", json={"ref": "tiny:1"}, headers=h.op)
    jobs = []
    for m in machines:
        r = await h.client.post(
            "/v1/jobs", json={"machine": m, "kind": "deploy", "image": "tiny"}, headers=h.op
        )
        jobs.append((await r.json())["id"])
    for m in machines[:2]:  # two agents took their jobs; the third machine's job is still queued
        await h.client.get("/v1/agent/jobs/next?wait=0", headers=h.agent(m))
    body = {"job_id": jobs[0], "manifest_digest": digest, "port": 7000, "chunks": 1, "have": ""}
    r = await h.client.post("/v1/agent/peers", json=body, headers=h.agent(machines[0]))
    reply = await r.json()
    assert r.status == 200 and (reply["seed_slot"], reply["seed_of"]) == (0, 2), reply


def report(t: Tracker, i: int, held: tuple[int, ...], *bad: int):  # type: ignore[no-untyped-def]
    """Agent i announces, reporting agents `bad` (by their urls) for bytes that failed verification."""
    urls = tuple(f"http://127.0.0.1:{7000 + b}" for b in bad)
    message = Announce(f"j-{i:012x}", IMAGE, 7000 + i, CHUNKS, bits(*held), bad=urls)
    return t.announce(mid(i), "127.0.0.1", message)


def test_a_peer_two_agents_report_for_bad_bytes_leaves_the_union_the_shares_and_the_answers() -> None:
    from controller.fleet.tracker import Shun

    shuns: list[Shun] = []
    t = Tracker(rng=random.Random(3), on_shun=shuns.append)
    for _ in range(2):  # all join, then each says the others served it
        for i in range(1, 5):
            announce(t, i, (i,), served={j: (j,) for j in range(1, 5) if j != i})
    announce(t, 9, tuple(range(CHUNKS)), complete=True)  # claims every chunk: slot 4 of 5
    reply = announce(t, 1, (1,))
    assert reply.seed_of == 5 and mid(9) in [p.machine_id for p in reply.peers]
    liar_share = sum(1 << i for i in (4, 9, 14))  # what of its claims the union counts, unproven
    assert Have.decode(reply.swarm_have, CHUNKS).bits == 0b11110 | liar_share

    report(t, 1, (1,), 9)
    reply = report(t, 1, (1,), 9)  # the same agent twice is one report
    assert mid(9) in [p.machine_id for p in reply.peers] and not reply.shunned and not shuns

    reply = report(t, 2, (2,), 9)
    assert shuns == [Shun(mid(9), "http://127.0.0.1:7009", IMAGE, (mid(1), mid(2)))]
    assert reply.shunned == ("http://127.0.0.1:7009",)
    assert Have.decode(reply.swarm_have, CHUNKS).bits == 0b11110, "the liar's claims left the union"
    assert reply.seed_of == 4 and mid(9) not in [p.machine_id for p in reply.peers]
    slots = sorted(announce(t, i, (i,)).seed_slot for i in range(1, 5))
    assert slots == [0, 1, 2, 3], "the shares closed up over its slot"
    assert all(announce(t, i, (i,)).shunned == ("http://127.0.0.1:7009",) for i in range(1, 5))

    # it announces on: it is answered (its deploy fetches from its own sources) and not recorded
    again = announce(t, 9, tuple(range(CHUNKS)), complete=True)
    assert (again.peers, again.seed_slot, again.seed_of) == ((), 0, 1)
    assert len(t) == 4 and mid(9) not in [p.machine_id for p in announce(t, 3, (3,)).peers]
    assert Have.decode(announce(t, 3, (3,)).swarm_have, CHUNKS).bits == 0b11110


def test_one_agent_alone_cannot_shun_a_peer_nor_report_itself_or_a_stranger() -> None:
    shuns: list[object] = []
    t = Tracker(rng=random.Random(4), on_shun=shuns.append)
    for i in range(1, 4):
        announce(t, i, (i,))
    for _ in range(5):
        report(t, 1, (1,), 2, 1, 77)  # an honest peer, itself, and nobody's url
    assert not shuns and len(t) == 3
    assert sorted(p.machine_id for p in announce(t, 3, (3,)).peers) == [mid(1), mid(2)]
    assert t.reports[IMAGE] == {mid(2): {mid(1)}}
    assert t.counts() == SwarmCounts(swarms=1, agents=3, reports=1, shunned=0, lapsed=0), "one report, once"

    # a peer reported by two is shunned once, and its state leaves with the swarm
    t2 = Tracker(TrackerPolicy(shun_after=3), rng=random.Random(5), on_shun=shuns.append)
    for i in range(1, 5):
        announce(t2, i, (i,))
    report(t2, 1, (1,), 4)
    report(t2, 2, (2,), 4)
    assert not shuns, "shun_after=3: two reports are not enough"
    report(t2, 3, (3,), 4)
    report(t2, 3, (3,), 4)
    assert len(shuns) == 1 and (t2.counts().reports, t2.counts().shunned, t2.counts().agents) == (3, 1, 3)
    for i in range(1, 4):
        leaving = Announce(f"j-{i:012x}", IMAGE, 7000 + i, CHUNKS, bits(i), leaving=True)
        t2.announce(mid(i), "127.0.0.1", leaving)
    assert not t2.swarms and not t2.shunned and not t2.reports and not t2.at


def test_the_union_counts_the_chunks_others_were_served_and_an_unvouched_share_for_a_while() -> None:
    """A claim costs nothing to make: the union (which paces the shares and says the swarm moves)
    counts the chunks another agent said it was served, and an agent's own share's chunks for
    `prove_within` from its first claim to one; nothing else it claims."""
    clock = Clock()
    t = Tracker(TrackerPolicy(interval=1.0, prove_within=10.0), clock=clock, rng=random.Random(6))
    liar_share = 1 << 4 | 1 << 9 | 1 << 14

    def union() -> int:
        return Have.decode(announce(t, 0, ()).swarm_have, CHUNKS).bits

    for i in range(4):
        announce(t, i)
    liar = announce(t, 4, tuple(range(CHUNKS)), complete=True)  # slot 4 of 5: chunks 4, 9, 14
    assert (liar.seed_slot, liar.seed_of) == (4, 5)
    assert union() == liar_share, "its own share only"
    reply = announce(t, 1, (1, 2))  # slot 1: chunk 1 is its share's, chunk 2 is not
    assert Have.decode(reply.swarm_have, CHUNKS).bits == 1 << 1 | liar_share
    firsts = {announce(t, 0, ()).peers[0].machine_id for _ in range(20)}
    assert firsts == {mid(1), mid(4)}, "its claim to be complete, unvouched, does not put it first"

    clock.now += 6
    announce(t, 2, (1, 2), served={1: (1, 2)})  # 2 got chunks 1 and 2 from 1: those claims count
    assert union() == 0b110 | liar_share
    clock.now += 5  # the liar's 10 s ran out, and nobody said it served a chunk
    assert union() == 0b110 and t.lapsed == 1
    clock.now += 15  # (2's own share, chunk 2, ran out too) vouched claims stay
    assert union() == 0b110 and t.lapsed == 2

    # a liar that serves one real chunk gets that one counted, not the rest of what it claims
    announce(t, 3, (5,), served={4: (5,)})
    assert union() == 0b110 | 1 << 5
    assert announce(t, 0, ()).peers[0].machine_id == mid(4), "completed and vouched for: first"


def test_each_share_chunk_counts_from_the_announce_that_first_claims_it_and_only_once() -> None:
    """An owner gets its share's chunks one by one over its deploy. A window from its first share
    claim alone left the later ones out of the union until someone vouched for them, which nobody
    did while the union said nobody held them: their next slot fetched them from the origin again.
    Each counts for `prove_within` (up to twice that) from its own first claim, and never again
    unvouched: not when claimed anew, nor after leaving and announcing again."""
    clock = Clock()
    t = Tracker(TrackerPolicy(interval=1.0, prove_within=10.0), clock=clock, rng=random.Random(5))
    start = clock.now
    for i in range(4):
        announce(t, i)  # agent 1's share: chunks 1, 5, 9, 13

    def union() -> int:
        announce(t, 3, ())  # (agents 2 and 3 stay in the swarm)
        announce(t, 2, ())
        return Have.decode(announce(t, 0, ()).swarm_have, CHUNKS).bits

    def at(seconds: float) -> None:
        clock.now = start + seconds

    announce(t, 1, (1,))  # chunk 1 counts until 10
    at(8)
    announce(t, 1, (1, 5))  # chunk 5, claimed while 1's window is open: until 20
    assert union() == 1 << 1 | 1 << 5
    at(12)
    assert union() == 1 << 5, "chunk 1 ran out unvouched; chunk 5 counts on"
    assert t.lapsed == 1
    announce(t, 1, (1, 5, 9, 0, 2))  # chunk 9 until 30; chunks 0 and 2 are not its share's
    assert union() == 1 << 5 | 1 << 9
    at(20.5)
    assert union() == 1 << 9
    announce(t, 1, (1, 9))  # 5 dropped and claimed again: counted once already
    announce(t, 1, (1, 5, 9))
    assert union() == 1 << 9
    at(30.5)
    assert union() == 0
    leave = Announce("j-000000000001", IMAGE, 7001, CHUNKS, bits(), leaving=True)
    t.announce(mid(1), "127.0.0.1", leave)
    reply = announce(t, 1, (1, 5, 9, 13))  # back, in the last slot: chunks 3, 7, 11, 15 now
    assert reply.seed_slot == 3 and union() == 0, "the share's new owner holds none of them"
    announce(t, 1, (3, 7, 13))
    assert union() == 1 << 3 | 1 << 7, "chunks new to its share count as any others"
    announce(t, 2, (), served={1: (1, 5, 13)})
    assert union() == 1 << 3 | 1 << 7 | 1 << 13, "vouched for: counted whoever's share they are"
    assert mid(1) in t.claims[IMAGE]
    announce(t, 2, (), served={1: (3, 7, 9)})
    announce(t, 1, (3, 7, 13))
    assert mid(1) not in t.claims[IMAGE], "all it counted unvouched is vouched for: nothing kept"


def test_no_share_claim_counts_unvouched_for_more_than_twice_the_time_to_prove() -> None:
    """Whatever an agent claims and drops, announce by announce (a liar trickling its claims to
    keep some of its share counted for ever): each share chunk counts unvouched from the announce
    that first claimed it, while claimed, for at least `prove_within`, and for at most twice it
    (and the interval the union waits to be OR-ed again)."""
    for seed in range(40):
        rng = random.Random(seed)
        clock = Clock()
        t = Tracker(TrackerPolicy(interval=1.0, prove_within=10.0, ttl=1e9), clock=clock)
        start = clock.now
        for i in range(2):
            announce(t, i)
        share = [i for i in range(CHUNKS) if i % 2 == 1]  # agent 1's
        first: dict[int, float] = {}
        for _ in range(60):
            clock.now += rng.choice((0.5, 1.0, 3.0, 7.0))
            held = tuple(i for i in range(CHUNKS) if rng.random() < 0.3)
            union = Have.decode(announce(t, 1, held).swarm_have, CHUNKS).bits
            for i in share:
                if i in held:
                    first.setdefault(i, clock.now)
                age = clock.now - first.get(i, clock.now)
                counted = bool(union >> i & 1)
                if i in held and age <= 10.0:
                    assert counted, (seed, i, clock.now - start, age)
                if counted:  # (the union is OR-ed again at most once an interval: dropped claims
                    # and ended windows leave it then)
                    assert i in first and age <= 21.0, (seed, i, clock.now - start, age)
            assert not union & ~sum(1 << i for i in share), "nothing outside its share"


def test_the_union_is_or_ed_again_only_when_a_claim_runs_out() -> None:
    # an announce costs O(1) big-int steps: the one pass over the swarm is due only when a claim that
    # counted unproven runs out (or when holdings leave)
    clock = Clock()
    t = Tracker(TrackerPolicy(interval=1.0, prove_within=10.0), clock=clock)
    for i in range(3):
        announce(t, i, (i,))
    assert t.lapse[IMAGE] == clock.now + 10
    passes = passes_of(t)
    for _ in range(5):
        clock.now += 1
        announce(t, 0, (0,))
    assert len(passes) == 0
    clock.now += 6
    announce(t, 0, (0,))
    assert len(passes) == 1 and IMAGE not in t.lapse, "the three claims ran out together; none is left"
    announce(t, 1, (1,), served={0: (0,)})
    assert len(passes) == 1 and Have.decode(announce(t, 2, (2,)).swarm_have, CHUNKS).bits == 0b1


def test_evicting_the_only_holding_of_a_swarm_leaves_the_newcomer_in_a_swarm_of_its_own() -> None:
    # the eviction removed the swarm the newcomer was about to join: it was kept in a dict nobody
    # held, and once the ttl ran out every announce, of any image, failed with a KeyError
    clock = Clock()
    t = Tracker(TrackerPolicy(max_agents=2, ttl=30.0), clock=clock)
    announce(t, 0, (0,))
    announce(t, 1, (1,), digest=OTHER)
    reply = announce(t, 2, (2,))  # evicts agent 0, the only holding of IMAGE
    assert mid(2) in t.swarms[IMAGE] and t.where[mid(2)] == IMAGE and mid(0) not in t.where
    assert reply.seed_of == 1, "alone in its swarm"
    clock.now += 100
    announce(t, 1, (1,), digest=OTHER)  # every holding expires: no KeyError
    assert len(t) == 1 and IMAGE not in t.swarms


def test_leaving_and_announcing_again_keeps_a_peers_reports_and_its_time_to_be_vouched_for() -> None:
    from controller.fleet.tracker import Shun

    clock = Clock()
    shuns: list[Shun] = []
    t = Tracker(TrackerPolicy(prove_within=10.0), clock=clock, on_shun=shuns.append)

    def leave(i: int, *bad: int) -> None:
        message = Announce(
            f"j-{i:012x}", IMAGE, 7000 + i, CHUNKS, bits(), leaving=True, bad=tuple(map(url, bad))
        )
        t.announce(mid(i), "127.0.0.1", message)

    for i in range(4):
        announce(t, i)
    liar = tuple(range(CHUNKS))
    announce(t, 3, liar)  # slot 3 of 4: chunks 3, 7, 11, 15 count for 10 s
    report(t, 1, (), 3)
    leave(3)
    announce(t, 3, liar)  # back at once, as a new holding
    assert not shuns and t.reports[IMAGE] == {mid(3): {mid(1)}}, "its record stays"
    clock.now += 11
    leave(3)
    reply = announce(t, 3, liar)
    assert Have.decode(reply.swarm_have, CHUNKS).bits == 0, "its 10 s did not start again"
    leave(2, 3)  # a report in a leaving announce counts too
    assert [s.machine_id for s in shuns] == [mid(3)] and mid(3) not in t.where


def test_a_vouch_with_a_bitmap_of_another_size_is_refused_by_name() -> None:
    import pytest

    from agent.protocol import ProtocolError

    t = Tracker()
    announce(t, 1, (1,))
    odd = Served(url(1), bits(0, n=4 * CHUNKS))
    message = Announce("j-000000000002", IMAGE, 7002, CHUNKS, bits(), served=(odd,))
    with pytest.raises(ProtocolError, match=r"served\[0\]\.have"):
        t.announce(mid(2), "127.0.0.1", message)
    assert len(t) == 1, "refused whole: the caller was not recorded"


def test_a_vouch_counts_only_the_chunks_the_peer_itself_claims() -> None:
    """One agent vouching every chunk of a peer that holds none made the union whole: no share
    paced, no chunk lacking, the swarm never seen to move (the liar's stall, by another route)."""
    t = Tracker(rng=random.Random(7))
    for i in range(3):
        announce(t, i)
    hostile = announce(t, 3, (), served={1: tuple(range(CHUNKS))})
    assert Have.decode(hostile.swarm_have, CHUNKS).bits == 0
    assert Have.decode(announce(t, 2).swarm_have, CHUNKS).bits == 0, "nor later, to anyone"
    honest = announce(t, 1, (4,))  # once the peer claims a chunk, the earlier vouch for it counts
    assert Have.decode(honest.swarm_have, CHUNKS).bits == 1 << 4


def test_a_url_another_agent_announced_is_refused_by_name_and_nothing_changes() -> None:
    """Two agents at one address (a NAT, a proxy not trusted) and one port: the second took the
    first's place in the url index, got its vouches, and once it left the first could be neither
    vouched for nor shunned. Refused now; an agent is never told its own url either."""
    import pytest

    from controller.fleet.errors import Conflict

    t = Tracker(rng=random.Random(8))
    announce(t, 1, (1,))
    announce(t, 2)
    thief = Announce("j-000000000003", IMAGE, 7001, CHUNKS, bits(1, 2, 3))
    with pytest.raises(Conflict, match=r"peer url http://127.0.0.1:7001: already announced by machine"):
        t.announce(mid(3), "127.0.0.1", thief)
    assert mid(3) not in t.where and t.at[IMAGE][url(1)] == mid(1) and len(t.slots[IMAGE]) == 2
    assert [p.url for p in announce(t, 2).peers] == [url(1)]
    t.announce(mid(1), "127.0.0.1", Announce("j-000000000001", IMAGE, 7001, CHUNKS, leaving=True))
    assert t.announce(mid(3), "127.0.0.1", thief).seed_of == 2, "free once its agent left"

    clock = Clock()  # ... or went silent for three intervals (a machine enrolled anew there)
    t = Tracker(TrackerPolicy(interval=1.0), clock=clock, rng=random.Random(9))
    announce(t, 1, (1,))
    clock.now += 2.9
    with pytest.raises(Conflict):
        t.announce(mid(3), "127.0.0.1", thief)
    clock.now += 0.2
    assert t.announce(mid(3), "127.0.0.1", thief).seed_of == 1 and mid(1) not in t.where


def test_agents_leaving_cost_one_pass_over_the_swarm_an_interval_not_one_each() -> None:
    """A pass at each leave cost O(N) an announce: 10,000 agents leaving at a deploy's end held the
    event loop for 72 s. A leave now moves the last slot's agent into the gap, and the union is
    OR-ed again once an interval."""
    clock = Clock()
    t = Tracker(TrackerPolicy(interval=1.0), clock=clock)
    n = 500
    for i in range(n):
        announce(t, i, (i % CHUNKS,))
    passes = passes_of(t)
    for i in range(n - 2):
        clock.now += 0.001
        t.announce(mid(i), "127.0.0.1", Announce(f"j-{i:012x}", IMAGE, 7000 + i, CHUNKS, leaving=True))
    assert len(passes) == 0, "all within one interval"
    clock.now += 1.0
    last = [announce(t, i, (i % CHUNKS,)) for i in (n - 2, n - 1)]
    assert len(passes) == 1
    assert sorted((r.seed_slot, r.seed_of) for r in last) == [(0, 2), (1, 2)]
    assert Have.decode(last[-1].swarm_have, CHUNKS).bits <= 0b11 << ((n - 2) % CHUNKS)


def test_a_step_of_the_wall_clock_moves_tickets_not_the_tracker_s_own_timers() -> None:
    """The tracker timed a holding's ttl by the wall clock: stepped back an hour, a silent agent
    stayed in the swarm and its answers for the hour."""
    clock, wall = Clock(), Clock()
    t = Tracker(TrackerPolicy(ttl=30.0), clock=clock, wall=wall)
    announce(t, 1, (1,))
    wall.now -= 3600
    clock.now += 31
    reply = announce(t, 2)
    assert mid(1) not in t.where and reply.seed_of == 1 and reply.peers == ()
    assert reply.grant.now == wall.now and reply.grant.expires == int(wall.now + 600)
