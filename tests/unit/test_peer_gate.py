"""Who gets a peer's upload slot (agent.peer.gate), how slow is judged (agent.peer.rates), and how a
share the swarm lacks passes on (Swarm._owns): the scheduling that brings a young swarm close to
the binomial pipeline."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import pytest

from agent.image.manifest import Manifest
from agent.peer import ticket
from agent.peer.bitmap import Have
from agent.peer.gate import UploadGate
from agent.peer.rates import Callers, Rates
from agent.peer.server import HELD_HEADER, PeerServer, ServeLimits, held_of
from agent.peer.swarm import SHARE_WAIT, Swarm
from agent.protocol import AnnounceReply, PeerGrant
from tests.images import MiB, random_image
from tests.peerkit import KEY, holding_all
from tests.stores import import_store


def in_thread(gate: UploadGate, held: int, out: list[tuple[int, bool, float]]) -> threading.Thread:
    def run() -> None:
        t0 = time.monotonic()
        ok = gate.enter(held)
        out.append((held, ok, time.monotonic() - t0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(cond: object, seconds: float = 2.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_a_free_slot_is_taken_at_once_and_a_caller_holding_chunks_never_waits() -> None:
    gate = UploadGate(slots=1, queue=4, wait=5.0)
    assert gate.enter(7), "a free slot goes to anyone"
    t0 = time.monotonic()
    assert not gate.enter(3), "slots full, and it holds chunks: 503 at once"
    assert not gate.enter(0, may_wait=False), "one known to read slowly does not wait either"
    assert time.monotonic() - t0 < 0.1
    gate.leave()
    assert gate.enter(3), "the slot is free again"


def test_a_caller_holding_nothing_waits_for_the_next_free_slot() -> None:
    gate = UploadGate(slots=1, queue=4, wait=5.0)
    assert gate.enter(5)
    out: list[tuple[int, bool, float]] = []
    thread = in_thread(gate, 0, out)
    wait_for(lambda: len(gate.waiters) == 1)
    assert not gate.enter(1), "it holds a chunk: turned away while another waits"
    time.sleep(0.2)
    gate.leave()
    thread.join(2)
    assert out and out[0][1] and out[0][2] >= 0.15, f"granted after the slot was given back: {out}"
    assert gate.active == 1, "the slot passed straight to the waiter"
    gate.leave()
    assert gate.active == 0


def test_the_neediest_waiter_gets_the_slot_and_a_full_queue_turns_away_the_least_needy() -> None:
    gate = UploadGate(slots=1, queue=2, wait=5.0, below=10)
    assert gate.enter(9)
    out: list[tuple[int, bool, float]] = []
    threads = []
    for count, held in enumerate((6, 4), 1):
        threads.append(in_thread(gate, held, out))
        wait_for(lambda count=count: len(gate.waiters) == count)  # type: ignore[misc]
    assert not gate.enter(8), "the queue is full of needier callers: turned away at once"
    threads.append(in_thread(gate, 1, out))  # needier than the queue's last: it takes 6's place
    threads[0].join(2)
    assert out[0][:2] == (6, False), f"the least needy waiter was turned away: {out}"
    gate.leave()
    wait_for(lambda: len(out) == 2)
    assert out[1][:2] == (1, True), f"the neediest waiter got the slot, not the earliest: {out}"
    gate.leave()
    wait_for(lambda: len(out) == 3)
    assert out[2][:2] == (4, True)
    gate.leave()
    assert gate.active == 0 and not gate.waiters


def test_a_waiter_gives_up_after_the_wait() -> None:
    gate = UploadGate(slots=1, queue=4, wait=0.3)
    assert gate.enter(0)
    t0 = time.monotonic()
    assert not gate.enter(0)
    assert 0.25 <= time.monotonic() - t0 < 1.0
    assert not gate.waiters, "it left the queue"
    with pytest.raises(ValueError, match="expected slots >= 1"):
        UploadGate(slots=0, queue=1, wait=1.0)


@pytest.mark.parametrize(
    ("text", "held"),
    [("3", 3), (" 0 ", 0), ("", 16), ("-1", 16), ("x", 16), ("99", 16), ("1" * 12, 16), ("\u0663", 16)],
)
def test_the_held_header_is_a_small_count_or_ranks_last(text: str, held: int) -> None:
    assert held_of(text, 16) == held


def test_slow_is_judged_against_the_recent_median_once_there_are_a_few() -> None:
    rates = Rates(keep=8, least=4)
    for r in (100.0, 110.0, 90.0):
        rates.add(r)
    assert rates.expected() is None and not rates.slow(1.0), "three rates are too few to judge"
    rates.add(105.0)
    assert rates.expected() == pytest.approx(102.5)
    assert rates.slow(20.0) and not rates.slow(30.0), "slow: below a quarter of the median"
    callers = Callers(most=2)
    for name in ("a", "b", "c"):
        callers.note(name, 1.0)
    assert callers.rate("a") is None and callers.rate("c") == 1.0, "bounded: the oldest forgotten"


# -- the server: an agent holding nothing is served before one that holds chunks -----------------------


def _get(port: int, digest: str, chunk_hex: str, holder: str, held: int) -> tuple[int, float]:
    text = ticket.encode(ticket.Ticket(digest, holder, 0, 10**11), KEY)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.monotonic()
    try:
        conn.request(
            "GET",
            f"/v1/peer/{digest}/{chunk_hex}",
            headers={"Authorization": f"Ticket {text}", HELD_HEADER: str(held)},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - t0
    finally:
        conn.close()


def test_a_busy_peer_queues_an_agent_holding_nothing_and_turns_away_one_holding_chunks(
    tmp_path: Path,
) -> None:
    src = random_image(tmp_path / "src.img", 4 * MiB, seed=5)
    _, manifest, digest = import_store(tmp_path / "store", src)
    # one upload slot at 2 MiB/s: a 1 MiB chunk holds it for about half a second
    limits = ServeLimits(uploads=1, rate=2 * MiB, queue=2, queue_wait=3.0)
    with holding_all(src, manifest, digest, limits, PeerServer) as server:
        chunk = manifest.chunk(0).hex
        results: dict[str, tuple[int, float]] = {}

        def ask(name: str, held: int) -> threading.Thread:
            def run() -> None:
                results[name] = _get(server.port, digest, chunk, f"m-{name:0>12}", held)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            return thread

        first = ask("a", 3)
        wait_for(lambda: server.gate.active == 1)
        empty = ask("b", 0)
        wait_for(lambda: len(server.gate.waiters) == 1)
        holding = ask("c", 2)
        for t in (first, empty, holding):
            t.join(10)
        assert results["c"][0] == 503, f"it holds chunks and the slot is taken: {results}"
        assert results["c"][1] < 0.3, "turned away at once, free to ask another peer"
        assert results["b"][0] == 200, f"it held nothing: it waited for the slot: {results}"
        assert results["b"][1] > 0.2, "served once the first upload was done"
        assert results["a"][0] == 200
        assert server.stats.busy == 1


# -- a share the swarm lacks passes on --------------------------------------------------------------------


def test_a_share_the_swarm_lacks_passes_to_one_more_owner_each_wait(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", 8 * MiB, seed=6)
    _, manifest, digest = import_store(tmp_path / "store", src)
    swarm = _swarm(manifest, digest, slot=3, of=10)
    t0 = 1000.0
    swarm._note_lacking(t0)
    assert 0 in swarm.lacking and 1 in swarm.lacking, "nobody holds chunks 0 and 1: the window's"
    assert not swarm._owns(1, t0), "chunk 1 is slot 1's share"
    wait = swarm._share_wait()
    assert wait >= SHARE_WAIT
    assert not swarm._owns(1, t0 + wait), "one wait: slot 2 may fetch it too, not yet slot 3"
    assert swarm._owns(1, t0 + 2 * wait + 0.01), "two waits: slots 2 and 3"
    assert swarm._owns(3, t0), "its own share, always"
    swarm.union = Have(len(manifest))
    swarm.union.bits = 0b11
    swarm._note_lacking(t0 + 2 * wait)
    assert 1 not in swarm.lacking and not swarm._owns(1, t0 + 3 * wait), (
        "held now: the share is slot 1's again"
    )
    swarm.chunk_seconds = 4.0
    assert swarm._share_wait() == pytest.approx(wait + 8.0), "two chunks' time more for slow chunks"


def _swarm(manifest: Manifest, digest: str, slot: int, of: int) -> Swarm:
    swarm = Swarm(
        manifest, digest, "j-000000000001", lambda m: AnnounceReply(PeerGrant(0, "00" * 32, "t", 0.0))
    )
    swarm.slot, swarm.of, swarm.interval = slot, of, 1.0
    return swarm


# -- the peer source: a peer far below the recent median is left after a short grace -----------------


def _swarm_with_peer(manifest: Manifest, digest: str, url: str) -> Swarm:
    """A swarm whose tracker names one peer, at `url`, holding every chunk (and 2 origin shares)."""
    from agent.protocol import PeerInfo

    full = Have(len(manifest))
    full.bits = (1 << len(manifest)) - 1
    reply = AnnounceReply(
        PeerGrant(0, "00" * 32, "t", 1e11), (PeerInfo("m-00000000000e", url, full.encode(), True),), 0, 2
    )
    swarm = Swarm(manifest, digest, "j-000000000001", lambda m: reply)
    swarm.announce()
    return swarm


def test_a_peer_far_slower_than_the_others_is_dropped_though_above_the_fixed_floor(tmp_path: Path) -> None:
    import socket

    from agent.peer.source import PeerOptions, PeerSource
    from agent.writer.errors import FetchError

    src = random_image(tmp_path / "src.img", 4 * MiB, seed=7)
    _, manifest, digest = import_store(tmp_path / "store", src)
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()
    length = manifest.chunk(1).length

    def serve() -> None:  # 200 KB/s: three times the fixed floor (64 KiB/s), far below 10 MB/s
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode())
            while not done.wait(0.1):
                try:
                    conn.sendall(b"x" * 20_000)
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    swarm = _swarm_with_peer(manifest, digest, url)
    source = PeerSource(swarm, PeerOptions(timeout=5.0))
    for _ in range(4):
        source.rates.add(10e6)  # what peers served here lately
    t0 = time.monotonic()
    try:
        with pytest.raises(FetchError):
            source.fetch_into(manifest.chunk(1), memoryview(bytearray(length)))
    finally:
        done.set()
        listener.close()
    took = time.monotonic() - t0
    assert url in swarm.dropped and "expected >= 2500000" in swarm.dropped[url], swarm.dropped
    assert took < 3.0, f"left after a grace of a second or so, not the chunk's deadline: {took:.1f} s"


def test_one_chunk_done_far_below_the_median_is_a_strike_and_two_in_a_row_drop_the_peer(
    tmp_path: Path,
) -> None:
    """A chunk a peer sent whole within the grace, at a tenth of the recent median, is one sample: a
    host's scheduler hiccup lost a peer that way (tests/integration/test_peers.py, 4 runs in 30)."""
    import http.server

    from agent.peer.source import PeerOptions, PeerSource

    src = random_image(tmp_path / "src.img", 8 * MiB, seed=9)
    _, manifest, digest = import_store(tmp_path / "store", src)
    data = src.read_bytes()
    pauses = [0.4, 0.0, 0.4, 0.4]  # before each body: slow, usual, slow, slow

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            chunk = next(c for c in manifest if self.path.endswith(c.hex))
            body = data[chunk.offset : chunk.offset + chunk.length]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(pauses.pop(0))
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    swarm = _swarm_with_peer(manifest, digest, url)
    source = PeerSource(swarm, PeerOptions(timeout=5.0))
    for _ in range(4):
        source.rates.add(20e6)  # what peers served here lately: a quarter is 1 MiB in 0.2 s
    try:
        for i in (1, 3, 5):  # not its origin share (the even ones)
            chunk = manifest.chunk(i)
            assert source.fetch_into(chunk, memoryview(bytearray(chunk.length))) == chunk.length
            assert url not in swarm.dropped, (i, swarm.dropped)
        chunk = manifest.chunk(7)
        assert source.fetch_into(chunk, memoryview(bytearray(chunk.length))) == chunk.length, "kept"
    finally:
        server.shutdown()
        server.server_close()
    assert url in swarm.dropped and "(2 chunks in a row)" in swarm.dropped[url], swarm.dropped


def test_the_origin_share_skips_a_chunk_a_known_peer_holds_and_takes_the_next(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", 8 * MiB, seed=8)
    _, manifest, digest = import_store(tmp_path / "store", src)
    swarm = _swarm(manifest, digest, slot=1, of=3)  # its share: chunks 1, 4, 7
    pending = (1 << len(manifest)) - 1
    assert swarm._share(pending) == 1
    swarm.peers["http://127.0.0.1:9"] = Have(len(manifest), 1 << 1)  # a peer holds chunk 1
    swarm.union = Have(len(manifest), 1 << 1)  # ... and the tracker counts it
    assert swarm._share(pending) == 4, "chunk 1 comes from that peer; 4 is the next of its share"
    swarm.lacking[0] = 0.0  # chunk 0 lacked for ages: passed on to every slot
    assert swarm._share(pending) == 0, "a share passed on to it, lower than its own"


# -- asks that found a peer busy are counted (the job's peers summary; the real fleet case's figure) ----


def test_asks_a_busy_peer_turned_away_are_counted(tmp_path: Path) -> None:
    import socket

    from agent.peer.source import PeerOptions, PeerSource
    from agent.writer.errors import FetchError

    src = random_image(tmp_path / "src.img", 4 * MiB, seed=8)
    _, manifest, digest = import_store(tmp_path / "store", src)
    listener = socket.create_server(("127.0.0.1", 0))
    asked: list[float] = []

    def serve() -> None:  # every request on every connection: 503
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while more := conn.recv(4096):
                    data += more
                    while b"\r\n\r\n" in data:
                        _, data = data.split(b"\r\n\r\n", 1)
                        asked.append(time.monotonic())
                        conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    swarm = _swarm_with_peer(manifest, digest, url)
    source = PeerSource(swarm, PeerOptions(timeout=5.0, max_wait=1.0, busy_backoff=0.05, max_backoff=0.05))
    try:
        for index in (1, 3):
            chunk = manifest.chunk(index)
            with pytest.raises(FetchError):
                source.fetch_into(chunk, memoryview(bytearray(chunk.length)))
            swarm.announce()  # the tracker says again that it holds every chunk
    finally:
        listener.close()
    assert len(asked) >= 2 and source.busy_answers == len(asked), (source.busy_answers, asked)
    assert url not in swarm.dropped, "busy is no reason to drop a peer"


def test_the_peer_that_just_served_is_asked_for_the_chunk_handed_out_for_it(tmp_path: Path) -> None:
    import socket

    from agent.peer.source import PeerOptions, PeerSource
    from agent.protocol import PeerInfo

    src = random_image(tmp_path / "src.img", 4 * MiB, seed=9)
    _, manifest, digest = import_store(tmp_path / "store", src)
    busy = socket.create_server(("127.0.0.1", 0))  # a second holder that accepts and never answers
    other = f"http://127.0.0.1:{busy.getsockname()[1]}"
    full = Have(len(manifest))
    full.bits = (1 << len(manifest)) - 1
    with holding_all(src, manifest, digest, ServeLimits(), PeerServer) as server:
        url = f"http://127.0.0.1:{server.port}"
        text = ticket.encode(ticket.Ticket(digest, "m-000000000001", 0, 10**11), KEY)
        grant = PeerGrant(0, "00" * 32, text, 1e11, next_key="")
        peers = (
            PeerInfo("m-00000000000a", url, full.encode(), True),
            PeerInfo("m-00000000000b", other, full.encode(), True),
        )
        swarm = Swarm(manifest, digest, "j-000000000001", lambda m: AnnounceReply(grant, peers, 0, 2))
        swarm.announce()
        swarm.keys[ticket.key_name("00000000", 0)] = KEY
        source = PeerSource(swarm, PeerOptions(timeout=1.0))
        for index in (1, 3, 1):
            swarm.follow[index] = url  # the order handed it out after `url` served one here
            chunk = manifest.chunk(index)
            buf = bytearray(chunk.length)
            assert source.fetch_into(chunk, memoryview(buf)) == chunk.length
            assert swarm.last == url, "served whole: followed next"
            swarm.last = None
    busy.close()
    assert other not in source.bytes_by_peer and source.connections == 1, "the silent holder never asked"
