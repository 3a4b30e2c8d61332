"""Agents share verified chunks on 127.0.0.1: real peer servers, the real tracker, a real origin.

Each agent is the writer's pipeline with a PeerSession (agent.peer.session) writing a sparse
file; the tracker is the controller's (controller.fleet.tracker), called in-process; the origin is
tests.chunkserver, which counts the bytes it serves.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.image.manifest import ChunkKind, Manifest
from agent.peer import ticket
from agent.peer.server import PeerServer
from agent.peer.session import PeerConfig, PeerSession
from agent.peer.source import PeerOptions
from agent.peer.swarm import PeerDropped, Swarm
from agent.protocol import Announce, AnnounceReply
from agent.writer.device import open_target
from agent.writer.events import WriteReport
from agent.writer.fetch import RetryPolicy
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.sources import HttpSource
from controller.fleet.tracker import Tracker, TrackerPolicy
from tests.chunkserver import serve
from tests.images import MiB, random_image
from tests.stores import import_store

OPTIONS = WriteOptions(workers=3, retry=RetryPolicy(retries=3, backoff=0.05, max_bad=3))
CONFIG = PeerConfig(host="127.0.0.1", fetch=PeerOptions(patience=5.0, timeout=2.0))


def announcer(tracker: Tracker, machine_id: str) -> Callable[[Announce], AnnounceReply]:
    lock = threading.Lock()  # the controller answers one request at a time per process here

    def call(message: Announce) -> AnnounceReply:
        with lock:
            return tracker.announce(machine_id, "127.0.0.1", message)

    return call


def stored_bytes(manifest: Manifest) -> int:
    return sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA)


class Node:
    """One simulated agent: its target, its peer session, its write."""

    def __init__(
        self, name: int, tmp_path: Path, manifest: Manifest, digest: str, tracker: Tracker, config: PeerConfig
    ) -> None:
        self.machine_id = f"m-{name:012x}"
        self.path = tmp_path / f"target-{name}.img"
        self.manifest, self.digest = manifest, digest
        self.target = open_target(str(self.path), manifest.image_size)
        self.dropped: list[PeerDropped] = []
        self.logs: list[str] = []
        self.session = PeerSession(
            manifest,
            digest,
            f"j-{name:012x}",
            announcer(tracker, self.machine_id),
            self.target.buffered_fd,
            config,
            self.logs.append,
            self.dropped.append,
        )
        self.report: WriteReport | None = None
        self.error: BaseException | None = None

    def write(self, origin: str) -> None:
        try:
            sources = self.session.sources([HttpSource(origin)])
            writer = Writer(self.manifest, self.digest, sources, self.target, self.session.options(OPTIONS))
            self.report = writer.run()
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.session.close()
        self.target.close()


def run_fleet(nodes: list[Node], origin: str) -> None:
    for node in nodes:
        node.session.__enter__()
    for node in nodes:  # every agent has joined: shares are final before anyone fetches
        node.session.swarm.announce()
    threads = [threading.Thread(target=n.write, args=(origin,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for node in nodes:
        assert node.error is None, f"{node.machine_id}: {node.error!r}"


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest, str, bytes]:
    src = random_image(tmp_path / "src.img", 12 * MiB, seed=15)
    root, manifest, digest = import_store(tmp_path / "store", src)
    return root, manifest, digest, src.read_bytes()


def test_three_agents_share_chunks_and_the_origin_serves_about_one_copy(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes]
) -> None:
    root, manifest, digest, data = store
    tracker = Tracker(TrackerPolicy(interval=0.2))
    nodes = [Node(i, tmp_path, manifest, digest, tracker, CONFIG) for i in range(3)]
    try:
        with serve(root) as origin:
            origin.delay = 0.05  # an origin slower than loopback peers, as a rack's uplink is
            run_fleet(nodes, origin.url)
            sent = origin.bytes_sent
    finally:
        for node in nodes:
            node.close()
    for node in nodes:
        assert node.path.read_bytes() == data, node.machine_id
        assert node.dropped == [], node.dropped
    one_copy = stored_bytes(manifest)
    assert sent <= 1.2 * one_copy, f"origin served {sent} bytes, expected about one copy ({one_copy})"
    from_peers = [n.report.bytes_by_source.get("peers", 0) for n in nodes if n.report]
    assert sum(from_peers) >= 2 * one_copy - (sent - one_copy) - 1, from_peers
    served = sum(n.session.server.stats.served_bytes for n in nodes)
    assert served == sum(from_peers), "every byte a peer fetched was served by a peer server"


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_only_a_ticket_for_the_image_fetches_and_refusals_are_logged(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes]
) -> None:
    root, manifest, digest, data = store
    tracker = Tracker(TrackerPolicy(interval=0.2))
    node = Node(1, tmp_path, manifest, digest, tracker, CONFIG)
    try:
        with serve(root) as origin:
            run_fleet([node], origin.url)
        port = node.session.server.port
        chunk = next(c for c in manifest if c.kind is ChunkKind.DATA)
        path = f"/v1/peer/{digest}/{chunk.hex}"
        valid = tracker.announce("m-00000000000b", "127.0.0.1", _announce(manifest, digest)).grant.ticket
        status, body = _get(port, path, {"Authorization": f"Ticket {valid}"})
        assert status == 200 and body == data[chunk.offset : chunk.offset + chunk.length]
        status, _ = _get(port, path, {})
        assert status == 401
        epoch = ticket.parse(valid)[0].epoch  # one whose key the node holds
        forged = ticket.encode(ticket.Ticket(digest, "m-00000000000c", epoch, 10**11, tracker.kid), b"k" * 32)
        other = ticket.encode(
            ticket.Ticket("cd" * 32, "m-00000000000b", epoch, 10**11, tracker.kid),
            ticket.fleet_key(tracker.secret, "cd" * 32, epoch),
        )
        for bad in (forged, other, valid[:-2], valid + "x"):
            status, _ = _get(port, path, {"Authorization": f"Ticket {bad}"})
            assert status == 403, bad
        for hostile in (
            "/v1/peer/../../etc/passwd",
            f"/v1/peer/{digest}/../{chunk.hex}",
            "/etc/passwd",
            path + "?x",
        ):
            status, body = _get(port, hostile, {"Authorization": f"Ticket {valid}"})
            assert status == 404 and b"root:" not in body, hostile
        assert node.session.server.stats.refused == 9, "the 401, the 403s and the paths that are none"
        refusals = [line for line in node.logs if "refused 127.0.0.1" in line]
        assert len(refusals) == 5 and "(401)" in refusals[0] and "expected 'Authorization" in refusals[0]
        assert all("(403)" in line and "peer ticket refused" in line for line in refusals[1:]), refusals
    finally:
        node.close()


def _announce(manifest: Manifest, digest: str) -> Announce:
    return Announce("j-00000000000b", digest, 9, len(manifest))


class CorruptingServer(PeerServer):
    """A peer that flips a byte of everything it sends (after its own check passed)."""

    def _send(self, h, index, offset, length, digest):  # type: ignore[no-untyped-def]
        import os

        real = os.pread
        data = bytearray(os.pread(self.fd, length, offset))
        data[length // 2] ^= 0x01
        h.send_response(200)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(bytes(data))
        with self.stats.lock:
            self.stats.served_bytes += length
        del real


def test_a_corrupting_peer_is_dropped_by_name_and_none_of_its_bytes_reach_the_target(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes]
) -> None:
    root, manifest, digest, data = store
    tracker = Tracker(TrackerPolicy(interval=0.2))
    # the corrupting agent holds the whole image (written honestly before), and says so
    bad = Node(9, tmp_path, manifest, digest, tracker, CONFIG)
    bad.path.write_bytes(data)
    bad.session.server.server_close()
    bad.session.server = CorruptingServer(bad.session.swarm, bad.target.buffered_fd, "127.0.0.1")
    for chunk in manifest:
        if chunk.kind is ChunkKind.DATA:
            bad.session.swarm.on_verified(chunk)
    impatient = PeerConfig(host="127.0.0.1", fetch=PeerOptions(patience=0.5, timeout=2.0))
    good = Node(1, tmp_path, manifest, digest, tracker, impatient)
    try:
        bad.session.__enter__()
        with serve(root) as origin:
            run_fleet([good], origin.url)
            sent = origin.bytes_sent
    finally:
        good.close()
        bad.close()
    bad_url = f"http://127.0.0.1:{bad.session.server.port}"
    assert good.path.read_bytes() == data
    assert [d.url for d in good.dropped] == [bad_url], good.dropped
    assert "served bad bytes for chunk" in good.dropped[0].reason
    assert bad.session.server.stats.served_bytes > 0, "the corrupting peer was asked"
    assert good.report is not None and good.report.bytes_by_source.get("peers", 0) == 0
    assert sent == stored_bytes(manifest), "what the bad peer could not give came from the origin"


def test_swarm_order_puts_the_origin_share_first() -> None:
    """A pure check of the fetch order the writer is given (no sockets)."""
    from agent.writer.plan import Action, Step
    from tests.unit.test_tracker import IMAGE

    chunks = 8
    manifest = _fake_manifest(chunks)
    swarm = Swarm(manifest, IMAGE, "j-000000000001", lambda m: (_ for _ in ()).throw(RuntimeError()))
    swarm.slot, swarm.of = 1, 4
    swarm.announces = 1  # as after an announce that worked (before one, every chunk in order)
    swarm.patience = 0.2  # nobody holds the rest: after that, they go to the sources in any order
    from agent.peer.bitmap import Have

    swarm.union = Have(chunks, 0b101)  # the swarm holds 0 and 2: share chunk 5 is paced too
    steps = [Step(c, Action.FETCH) for c in manifest]
    order = []
    for s in swarm.order(iter(steps)):
        order.append(s.chunk.index)
        swarm.settled(s.chunk.index)  # what the peer source says once the chunk left it
    assert sorted(order[:2]) == [1, 5] and sorted(order) == list(range(chunks))


def test_the_swarm_reports_peers_that_served_bad_bytes_and_drops_those_the_tracker_shunned() -> None:
    """A pure check of the swarm's side of shunning and vouching (no sockets): a bad-bytes drop is
    told to the tracker once (again after a failed announce); a shunned peer stops being a holder of
    anything, so this agent's share goes to the origin again; a peer that served is vouched for."""
    from agent.peer.bitmap import Have
    from agent.protocol import AnnounceReply, PeerGrant, PeerInfo
    from tests.unit.test_tracker import IMAGE

    chunks = 8
    full = (1 << chunks) - 1
    liar, slow, honest = "http://127.0.0.9:4000", "http://127.0.0.8:4000", "http://127.0.0.10:4000"
    sent: list[Announce] = []
    answers: list[AnnounceReply | Exception] = []

    def announcer(message: Announce) -> AnnounceReply:
        sent.append(message)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def reply(*shunned: str) -> AnnounceReply:
        peers = (
            PeerInfo("m-000000000009", liar, Have(chunks, full).encode(), True),
            PeerInfo("m-00000000000a", honest, Have(chunks, 0b10).encode(), False),
        )
        grant = PeerGrant(0, "00" * 32, "t", 0.0)
        return AnnounceReply(grant, peers, 0, 2, swarm_have=Have(chunks, full).encode(), shunned=shunned)

    swarm = Swarm(_fake_manifest(chunks), IMAGE, "j-000000000001", announcer)
    answers.append(reply())
    swarm.announce()
    assert not swarm.mine(0), "the liar claims chunk 0: a known holder, so no origin fetch"
    swarm.drop(slow, "slow: 10 bytes/s")  # not for bad bytes: not reported
    swarm.drop(honest, "served bad bytes for chunk 1", bad=True)
    answers += [RuntimeError("the controller is away"), reply(), reply()]
    with pytest.raises(RuntimeError):
        swarm.announce()
    swarm.announce()
    swarm.announce()
    assert [m.bad for m in sent] == [(), (honest,), (honest,), ()], "told until an announce got through"

    answers.append(reply(liar))
    swarm.announce()
    assert swarm.dropped[liar].startswith("removed from the swarm by the controller")
    assert liar not in swarm.peers and swarm.mine(0), "the share is the origin's again"
    answers.append(reply(liar))
    swarm.announce()
    assert liar not in swarm.peers, "a later answer naming it as a peer does not bring it back"
    assert [m.bad for m in sent[-2:]] == [(), ()], "dropped on the tracker's word: nothing to report"

    # a peer dropped as slow whose bytes then fail the digest is reported all the same (a peer
    # that sent garbage slowly was never reported), once
    late = "http://127.0.0.7:4000"
    swarm.drop(late, "slow: 100 bytes/s")
    swarm.drop(late, "served bad bytes for chunk 2", bad=True)
    swarm.drop(late, "served bad bytes for chunk 3", bad=True)
    answers.append(reply())
    swarm.announce()
    assert sent[-1].bad == (late,) and swarm.dropped[late].startswith("slow")

    # a peer that served a chunk that verified is vouched for once, at the next announce
    swarm.served_by(honest, 1)
    swarm.served_by(honest, 3)
    swarm.served_by(slow, 2)
    answers += [reply(), reply()]
    swarm.announce()
    swarm.announce()
    told = [[(v.url, Have.decode(v.have, chunks).bits) for v in m.served] for m in sent[-2:]]
    assert told == [[(honest, 0b1010), (slow, 0b100)], []]


def test_an_agent_is_alone_when_the_swarm_has_nobody_else_the_shunned_counted_once() -> None:
    """seed_of counts the agents the tracker holds: those this agent dropped are among them and are
    subtracted; those the tracker shunned are not (subtracted again, 2 shunned in a swarm of 3 made
    an agent alone and take chunks outside its share from the origin)."""
    from agent.peer.bitmap import Have
    from agent.protocol import AnnounceReply, PeerGrant
    from tests.unit.test_tracker import IMAGE

    chunks = 4
    shunned = ("http://127.0.0.8:4000", "http://127.0.0.9:4000")
    grant = PeerGrant(0, "00" * 32, "t", 0.0)
    reply = AnnounceReply(grant, (), 0, 2, swarm_have=Have(chunks, 0).encode(), shunned=shunned)
    swarm = Swarm(_fake_manifest(chunks), IMAGE, "j-000000000001", lambda m: reply)
    swarm.announce()
    assert all(url in swarm.dropped for url in shunned)
    assert not swarm.alone(), "one other agent is still in the swarm (seed_of 2)"
    swarm.drop("http://127.0.0.10:4000", "slow: 1 bytes/s")  # that one, dropped here
    assert swarm.alone()


def _fake_manifest(n: int) -> Manifest:
    from agent.image.manifest import ChunkEntry, Encoding, Metadata

    entries = [ChunkEntry(bytes([i]) * 32, ChunkKind.DATA, Encoding.RAW, MiB) for i in range(n)]
    return Manifest.build(n * MiB, MiB, Metadata("x", "1"), entries)


def test_origin_shares_are_paced_by_what_the_swarm_holds() -> None:
    from agent.peer.bitmap import Have
    from agent.peer.swarm import WINDOW
    from tests.unit.test_tracker import IMAGE

    manifest = _fake_manifest(12)
    swarm = Swarm(manifest, IMAGE, "j-000000000001", lambda m: (_ for _ in ()).throw(RuntimeError()))
    assert [i for i in range(12) if swarm.paced(i)] == list(range(WINDOW + 1))
    swarm.union = Have(12, 0b111)  # the swarm holds chunks 0-2
    assert [i for i in range(12) if swarm.paced(i)] == list(range(3 + WINDOW + 1))
    swarm.on_verified(manifest.chunk(3))  # and this agent chunk 3
    assert max(i for i in range(12) if swarm.paced(i)) == 4 + WINDOW


def test_an_agent_whose_first_announce_failed_fetches_from_peers_once_one_works(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes]
) -> None:
    """A controller restarting, or a tracker that refused the first announce, turned peers off for
    the whole job: its later announces made it serve, never fetch."""
    root, manifest, digest, data = store
    tracker = Tracker(TrackerPolicy(interval=0.1))
    seed = Node(0, tmp_path, manifest, digest, tracker, CONFIG)
    late = Node(1, tmp_path, manifest, digest, tracker, CONFIG)
    refused: list[Announce] = []
    works = late.session.swarm.announcer

    def first_fails(message: Announce) -> AnnounceReply:
        if not refused:
            refused.append(message)
            raise RuntimeError("POST /v1/agent/peers: HTTP 503: the controller is restarting")
        return works(message)

    late.session.swarm.announcer = first_fails
    late.session.swarm.interval = 0.1  # its next announce soon (the first reply would say so)
    try:
        with serve(root) as origin:
            run_fleet([seed], origin.url)  # it holds every chunk, and serves on
            origin.delay = 0.3  # the rest would take the late agent 1-2 s from the origin
            late.session.__enter__()
            assert late.session.swarm.announces == 0, "its first announce failed"
            late.write(origin.url)
            assert late.error is None, repr(late.error)
    finally:
        late.close()
        seed.close()
    assert late.path.read_bytes() == data
    assert late.report is not None
    from_peers = late.report.bytes_by_source.get("peers", 0)
    assert from_peers >= stored_bytes(manifest) // 2, (
        f"{from_peers} bytes from peers: expected most of the image once its second announce worked"
        f" ({late.report.bytes_by_source})"
    )
    assert any("announce failed" in line for line in late.logs) and any(
        "announces work again" in line for line in late.logs
    ), late.logs
