"""Hostile callers and hostile peers against the peer server and the peer source, on 127.0.0.1.

Each case is one the security review reproduced: a caller that opens connections and says nothing,
a ticket holder that reads an upload slowly, a peer that trickles bytes, a peer that claims every
chunk and answers 404. Each must cost the agent seconds, not a thread forever.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.image.manifest import ChunkKind, Manifest
from agent.peer import ticket
from agent.peer.bitmap import Have
from agent.peer.server import PeerServer, RefusalLog, ServeLimits
from agent.peer.source import PeerOptions, PeerSource
from agent.peer.swarm import Swarm
from agent.protocol import AnnounceReply, PeerGrant, PeerInfo
from agent.writer.errors import FetchError
from tests.images import MiB, random_image
from tests.peerkit import KEY, holding_all, settle
from tests.stores import import_store


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Manifest, str]:
    src = random_image(tmp_path / "src.img", 4 * MiB, seed=3)
    _, manifest, digest = import_store(tmp_path / "store", src)
    return src, manifest, digest


class SmallBufferServer(PeerServer):
    """Send buffers of a few KiB, so a caller that does not read blocks the upload at once."""

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return conn, addr


def running(
    image: tuple[Path, Manifest, str], limits: ServeLimits
) -> contextlib.AbstractContextManager[PeerServer]:
    return holding_all(*image, limits, SmallBufferServer)


@pytest.fixture
def server(image: tuple[Path, Manifest, str]) -> Iterator[PeerServer]:
    with running(image, ServeLimits(uploads=1, timeout=0.5, connections=4, upload_seconds=1.0)) as srv:
        yield srv


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """The server closed the connection within `seconds` (reading whatever it sent before)."""
    sock.settimeout(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def test_silent_connections_are_capped_and_cut_off_after_the_timeout(server: PeerServer) -> None:
    threads = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    try:
        for s in socks:
            s.send(b"GET /v1/peer/")  # a request line that never ends
        time.sleep(0.2)
        # beyond the cap of 4 the server closes at once: no thread, no descriptor held
        assert threading.active_count() - threads <= 4
        assert sum(closed_within(s, 0.05) for s in socks) >= 8
        # the 4 it took are cut off after the timeout (0.5 s), well before a second has passed
        assert all(closed_within(s, 1.5) for s in socks)
        assert threading.active_count() - threads <= 0 or _settles(threads)
    finally:
        for s in socks:
            s.close()
    # and the server still serves an honest caller
    status = _get_status(server, authorised=True)
    assert status == 200


def test_a_caller_trickling_its_request_a_byte_at_a_time_is_cut_off_after_the_timeout(
    server: PeerServer,
) -> None:
    # each byte comes within the timeout (0.5 s): only a deadline for the whole request ends it
    threads = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        for s in socks:
            s.sendall(b"GET /v1/peer/ HTTP/1.1\r\n")
        t0, cut = time.monotonic(), set()
        while len(cut) < len(socks) and time.monotonic() - t0 < 3:
            for i, s in enumerate(socks):
                try:
                    s.sendall(b"X")
                except OSError:
                    cut.add(i)
            time.sleep(0.2)
        assert len(cut) == len(socks), f"{len(socks) - len(cut)} trickling callers held past 3 s"
        assert _settles(threads)
    finally:
        for s in socks:
            s.close()
    assert _get_status(server, authorised=True) == 200  # the connections are free again


def test_one_address_holds_at_most_its_share_of_the_connections(image: tuple[Path, Manifest, str]) -> None:
    # a host without a ticket kept every slot (32) with connections reopened every `timeout`; now
    # it gets `per_address` of them, and the fleet's callers from other addresses still get in
    limits = ServeLimits(timeout=2.0, connections=8, per_address=3)
    with running(image, limits) as server:
        lines: list[str] = []
        server.log = lines.append
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        try:
            for s in socks:
                s.send(b"GET /v1/peer/")  # a request that never ends: each holds its connection
            held = [s for s in socks if not closed_within(s, 0.3)]
            assert len(held) == 3, f"{len(held)} connections held from one address, expected 3"
            sock, request = _request(server, authorised=True, source="127.0.0.2")
            with sock:
                sock.sendall(request)
                sock.settimeout(5)
                assert sock.recv(64).split()[1] == b"200", "another address was turned away"
            assert any("refused 127.0.0.1" in line and "at most 3 per address" in line for line in lines), (
                lines
            )
            held[0].close()  # a connection it closes frees its share for its next one
            assert settle(lambda: server.by_address.get("127.0.0.1") == 2, 3.0)
            assert _get_status(server, authorised=True) == 200
        finally:
            for s in socks:
                s.close()
        assert settle(lambda: not server.by_address and server.open == 0, 3.0), server.by_address


def _answers(server: PeerServer, raw: bytes) -> bytes:
    """Everything the server sends on one connection for `raw`, until it closes it."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw)
        sock.settimeout(3)
        out = b""
        while data := sock.recv(65536):
            out += data
        return out


def test_a_request_body_is_never_taken_for_the_next_request_and_head_gets_no_body(
    server: PeerServer,
) -> None:
    path = f"/v1/peer/{server.swarm.digest}/{'0' * 64}"
    inner = f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
    for method in ("POST", "PUT", "GET"):
        raw = f"{method} {path} HTTP/1.1\r\nContent-Length: {len(inner)}\r\n\r\n".encode() + inner
        out = _answers(server, raw)
        assert out.count(b"HTTP/1.1 ") == 1, (method, out)
    out = _answers(server, f"HEAD {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 405") and out.endswith(b"\r\n\r\n"), out


def _settles(threads: int) -> bool:
    end = time.monotonic() + 2
    while time.monotonic() < end:
        if threading.active_count() <= threads:
            return True
        time.sleep(0.05)
    return False


def _request(
    server: PeerServer, authorised: bool, rcvbuf: int = 0, text: str = "", source: str = ""
) -> tuple[socket.socket, bytes]:
    chunk = next(c for c in server.swarm.manifest if c.kind is ChunkKind.DATA)
    text = text or ticket.encode(ticket.Ticket(server.swarm.digest, "m-00000000000b", 0, 10**11), KEY)
    auth = f"Authorization: Ticket {text}\r\n" if authorised else ""
    sock = socket.socket()
    if rcvbuf:  # before connecting: the window is agreed then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:  # another host's connection (loopback: nothing leaves the machine)
        sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    request = f"GET /v1/peer/{server.swarm.digest}/{chunk.hex} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
    return sock, request.encode()


def _get_status(server: PeerServer, authorised: bool, text: str = "") -> int:
    sock, request = _request(server, authorised, text=text)
    with sock:
        sock.sendall(request)
        sock.settimeout(5)
        head = sock.recv(64)
    return int(head.split()[1])


def test_a_ticket_holder_reading_slowly_loses_its_upload_slot(image: tuple[Path, Manifest, str]) -> None:
    # each write finishes within the socket timeout (2 s), so only a deadline for the whole upload
    # (1 s) stops a reader this slow from holding the slot for the whole chunk
    limits = ServeLimits(uploads=1, timeout=2.0, upload_seconds=1.0)
    with running(image, limits) as server, contextlib.ExitStack() as stack:
        for _ in range(4):  # the rates of a few whole uploads, which a slow one is judged against
            other = ticket.encode(ticket.Ticket(server.swarm.digest, "m-00000000000c", 0, 10**11), KEY)
            sock, request = _request(server, authorised=True, text=other)
            with sock:
                sock.sendall(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                while sock.recv(1 << 20):
                    pass
        sock, request = _request(server, authorised=True, rcvbuf=65536)
        stack.enter_context(sock)
        sock.sendall(request)
        got, t0 = 0, time.monotonic()
        sock.settimeout(0.2)
        while time.monotonic() - t0 < 7:
            try:
                n = len(sock.recv(16384))
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not n:
                break
            got += n
            time.sleep(0.08)  # about 200 KB/s: a 1 MiB chunk would take over 5 s
        took = time.monotonic() - t0
        # cut off after upload_seconds (1 s) plus at most one write, having sent a part of the chunk
        assert took < 3.5, f"the slow upload lasted {took:.1f} s, expected under 3.5"
        assert got < MiB
        assert server.gate.enter(0, may_wait=False), "the upload slot is still held"
        server.gate.leave()
        # and its next ask is not queued for a slot (an upload cut off each time was never noted)
        last = server.callers.rate("m-00000000000b")
        assert last is not None and server.rates.slow(last), (last, server.rates.expected())


class FakePeer:
    """A 'peer' on 127.0.0.1 that claims every chunk and answers with `behaviour` (one connection
    at a time): 'trickle' sends the right header then a byte every 0.3 s, 'trickle-head' a header
    byte every 0.3 s, 'continue' a '100 Continue' every 0.3 s, 'chunked-trickle' a chunked body's
    size line a byte every 0.3 s; '404' and '503' refuse."""

    def __init__(self, behaviour: str, length: int) -> None:
        self.behaviour, self.length = behaviour, length
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.hits = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                self.hits += 1
                try:
                    if self.behaviour == "trickle":
                        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.length}\r\n\r\n".encode())
                        while not self.done.wait(0.3):
                            conn.sendall(b"x")
                    elif self.behaviour == "trickle-head":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                        while not self.done.wait(0.3):
                            conn.sendall(b"x")
                    elif self.behaviour == "chunked-trickle":
                        head = f"HTTP/1.1 200 OK\r\nContent-Length: {self.length}\r\n"
                        conn.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
                        while not self.done.wait(0.3):
                            conn.sendall(b"0")  # a chunk-size line that never ends
                    elif self.behaviour == "escapes":
                        conn.sendall(b"\x1b[2J\x1b]0;owned\x07" * 4000 + b"\r\n\r\n")
                    elif self.behaviour == "continue":
                        while not self.done.wait(0.3):
                            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    else:
                        status = {
                            "404": "404 Not Found",
                            "503": "503 Busy",
                            "403": "403 Forbidden",
                            "key-unknown": "403 Forbidden\r\nX-Sledge-Key: unknown",
                        }[self.behaviour]
                        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        self.done.set()
        self.listener.close()


def swarm_with(peer: FakePeer | str, manifest: Manifest, digest: str) -> Swarm:
    url = peer if isinstance(peer, str) else peer.url
    full = Have(len(manifest))
    full.bits = (1 << len(manifest)) - 1
    reply = AnnounceReply(
        PeerGrant(0, "00" * 32, "t", 1e11),
        (PeerInfo("m-00000000000e", url, full.encode(), True),),
        seed_slot=0,
        seed_of=2,
    )
    swarm = Swarm(manifest, digest, "j-000000000001", lambda m: reply)
    swarm.announce()
    return swarm


def fetch_in_thread(
    source: PeerSource, manifest: Manifest, index: int
) -> tuple[threading.Thread, list[object]]:
    chunk = manifest.chunk(index)
    out: list[object] = []

    def run() -> None:
        try:
            out.append(source.fetch_into(chunk, memoryview(bytearray(chunk.length))))
        except FetchError as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_trickling_peer_is_dropped_within_the_chunk_deadline(image: tuple[Path, Manifest, str]) -> None:
    _, manifest, digest = image
    peer = FakePeer("trickle", manifest.chunk(1).length)
    try:
        swarm = swarm_with(peer, manifest, digest)
        # a 1 MiB chunk at >= 512 KiB/s: the whole chunk within 1 + 2 s, whatever each read does
        source = PeerSource(swarm, PeerOptions(timeout=1.0, min_rate=512 << 10, patience=30.0, max_wait=8.0))
        thread, out = fetch_in_thread(source, manifest, 1)
        thread.join(6)
        assert not thread.is_alive(), "the fetch is still held by a peer sending a byte every 0.3 s"
        assert peer.url in swarm.dropped and "trickled" in swarm.dropped[peer.url], swarm.dropped
        assert isinstance(out[0], FetchError) and out[0].missing  # on to the origin
    finally:
        peer.close()


HEAD_LATE = "expected the head of the answer for chunk 1 within 1.0 s"


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [
        ("trickle-head", HEAD_LATE),
        ("continue", HEAD_LATE),  # one '100 Continue' after another
        # a chunked 200 whose size line comes a byte at a time: read inside read1, past every rate
        # check, so any Transfer-Encoding is refused (a peer server always sends Content-Length)
        ("chunked-trickle", "Transfer-Encoding 'chunked', expected none"),
    ],
)
def test_a_peer_trickling_its_answer_s_head_or_framing_is_dropped_within_the_timeout(
    image: tuple[Path, Manifest, str], behaviour: str, why: str
) -> None:
    _, manifest, digest = image
    peer = FakePeer(behaviour, manifest.chunk(1).length)
    try:
        swarm = swarm_with(peer, manifest, digest)
        source = PeerSource(swarm, PeerOptions(timeout=1.0, min_rate=512 << 10, patience=30.0, max_wait=8.0))
        thread, out = fetch_in_thread(source, manifest, 1)
        thread.join(4)
        assert not thread.is_alive(), f"the fetch is still held by a peer sending {behaviour} slowly"
        assert why in swarm.dropped.get(peer.url, ""), swarm.dropped
        assert isinstance(out[0], FetchError) and out[0].missing  # on to the origin
    finally:
        peer.close()


def test_a_peer_below_the_minimum_rate_is_left_after_a_short_grace_not_the_chunk_deadline(
    image: tuple[Path, Manifest, str],
) -> None:
    from agent.peer.source import RATE_GRACE

    _, manifest, digest = image
    peer = FakePeer("trickle", manifest.chunk(1).length)
    try:
        swarm = swarm_with(peer, manifest, digest)
        # the chunk's deadline is 10 + 26 s; its rate is plain after RATE_GRACE
        source = PeerSource(swarm, PeerOptions(timeout=10.0, min_rate=40 << 10, patience=30.0, max_wait=12.0))
        t0 = time.monotonic()
        thread, out = fetch_in_thread(source, manifest, 1)
        thread.join(RATE_GRACE + 3)
        assert not thread.is_alive(), "still reading a trickle past the grace"
        assert time.monotonic() - t0 < RATE_GRACE + 3
        assert peer.url in swarm.dropped and "bytes/s, expected >=" in swarm.dropped[peer.url], swarm.dropped
        assert isinstance(out[0], FetchError) and out[0].missing
    finally:
        peer.close()


def test_an_interrupted_source_stops_reading_a_trickle_at_once(image: tuple[Path, Manifest, str]) -> None:
    _, manifest, digest = image
    peer = FakePeer("trickle", manifest.chunk(1).length)
    try:
        swarm = swarm_with(peer, manifest, digest)
        source = PeerSource(swarm, PeerOptions(timeout=1.0, min_rate=1, patience=30.0))
        thread, _ = fetch_in_thread(source, manifest, 1)
        time.sleep(0.5)
        source.interrupt()
        thread.join(2)
        assert not thread.is_alive(), "interrupt() did not stop a read loop"
        assert peer.url not in swarm.dropped  # being interrupted is no fault of the peer's
    finally:
        peer.close()


@pytest.mark.parametrize("behaviour", ["404", "503"])
def test_a_peer_claiming_chunks_it_does_not_serve_is_dropped(
    image: tuple[Path, Manifest, str], behaviour: str
) -> None:
    _, manifest, digest = image
    peer = FakePeer(behaviour, 0)
    stop = threading.Event()
    try:
        swarm = swarm_with(peer, manifest, digest)
        # the tracker keeps saying the peer holds everything (it announces complete=True)
        announcer = threading.Thread(
            target=lambda: [swarm.announce() for _ in iter(lambda: stop.wait(0.05), True)]
        )
        announcer.start()
        source = PeerSource(swarm, PeerOptions(timeout=1.0, patience=1.0))
        t0 = time.monotonic()
        index = 1
        # the writer asks again and again (a 503-answering peer is left alone a while, longer each
        # time, between tries)
        while peer.url not in swarm.dropped and time.monotonic() - t0 < 8:
            thread, _ = fetch_in_thread(source, manifest, index)
            thread.join(10)
            assert not thread.is_alive()
            index = 4 - index  # chunks 1 and 3
            time.sleep(0.1)
        assert peer.url in swarm.dropped, f"{peer.hits} {behaviour} answers and still asked"
        assert time.monotonic() - t0 < 8
        assert peer.hits <= 200  # not a busy loop against it either
    finally:
        stop.set()
        peer.close()


@pytest.mark.parametrize(("behaviour", "dropped"), [("key-unknown", False), ("403", True)])
def test_a_peer_lacking_our_key_is_asked_again_later_one_refusing_the_ticket_is_dropped(
    image: tuple[Path, Manifest, str], behaviour: str, dropped: bool
) -> None:
    _, manifest, digest = image
    peer = FakePeer(behaviour, 0)
    try:
        swarm = swarm_with(peer, manifest, digest)
        source = PeerSource(swarm, PeerOptions(timeout=1.0, patience=30.0, max_wait=0.5))
        thread, out = fetch_in_thread(source, manifest, 1)
        thread.join(5)
        assert isinstance(out[0], FetchError) and out[0].missing
        assert (peer.url in swarm.dropped) is dropped, swarm.dropped
        if not dropped:
            swarm.announce()  # its next announce: it is a holder again, after a short back-off
            time.sleep(PeerOptions().max_backoff)
            assert peer.url in swarm.holders(1)
    finally:
        peer.close()


def test_a_peer_s_garbage_reaches_the_drop_s_reason_quoted_and_cut(image: tuple[Path, Manifest, str]) -> None:
    """A status line of 44 KB of terminal escapes went whole into the job's events."""
    _, manifest, digest = image
    peer = FakePeer("escapes", 0)
    try:
        swarm = swarm_with(peer, manifest, digest)
        source = PeerSource(swarm, PeerOptions(timeout=1.0, max_wait=0.5))
        thread, _ = fetch_in_thread(source, manifest, 1)
        thread.join(5)
        reason = swarm.dropped[peer.url]
        assert reason.startswith("BadStatusLine: '") or reason.startswith("LineTooLong: "), reason
        assert len(reason) < 400 and reason.isprintable() and "\\x1b[2J" in reason, reason
    finally:
        peer.close()


def test_refusals_are_logged_at_most_a_few_a_minute_per_caller_then_counted() -> None:
    log = RefusalLog(first=3, window=60.0)
    lines = [line for i in range(50) for line in log.note("10.0.0.9", f"(401) #{i}", now=100.0 + i / 10)]
    assert [line for line in lines if "refused 10.0.0.9" in line] == [
        f"peer server: refused 10.0.0.9 (401) #{i}" for i in range(3)
    ]
    assert len(lines) == 4 and "counted, not logged" in lines[3]
    assert log.note("10.0.0.8", "(403) other", now=101.0) == ["peer server: refused 10.0.0.8 (403) other"]
    later = log.note("10.0.0.9", "(401) next minute", now=161.0)
    assert later == [
        "peer server: 47 more refusals of 10.0.0.9 in 60 s were not logged",
        "peer server: refused 10.0.0.9 (401) next minute",
    ]


def test_a_caller_looping_on_refused_requests_makes_a_few_log_lines(
    image: tuple[Path, Manifest, str],
) -> None:
    src, manifest, digest = image
    lines: list[str] = []
    fd = os.open(src, os.O_RDONLY)
    swarm = Swarm(
        manifest, digest, "j-000000000001", lambda m: AnnounceReply(PeerGrant(0, "00" * 32, "t", 0.0))
    )
    server = PeerServer(swarm, fd, "127.0.0.1", 0, log=lines.append).start()
    try:
        for _ in range(40):
            assert _get_status(server, authorised=False) == 401
        assert server.stats.refused == 40
        assert len(lines) <= 6, lines
    finally:
        server.close()
        os.close(fd)


def test_a_refusal_closes_its_connection_and_an_address_refused_too_often_is_closed_unread(
    image: tuple[Path, Manifest, str],
) -> None:
    """A caller without a ticket looping on kept connections kept the agent's interpreter busy
    parsing (its own write ran 16x slower): each refusal now closes the connection, and past
    `refusals` a minute an address's connections are closed at once. Other callers are served."""
    with running(image, ServeLimits(refusals=5)) as server:
        sock, request = _request(server, authorised=False, source="127.0.0.31")
        with sock:
            sock.sendall(request + request)  # a second request on the same connection is not read
            sock.settimeout(3)
            out = b""
            while data := sock.recv(65536):
                out += data
        assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 401"), out
        assert b"Connection: close" in out
        for bad in ("/etc/passwd", f"/v1/peer/{server.swarm.digest}/../x"):
            path = f"GET {bad} HTTP/1.1\r\n\r\n".encode()
            assert _answers(server, path).startswith(b"HTTP/1.1 404"), "not a peer path: refused too"
        for _ in range(4):
            assert _get_status_from(server, "127.0.0.31") == 401
        assert server.refusals.count("127.0.0.31", time.monotonic()) == 5
        sock, request = _request(server, authorised=True, source="127.0.0.31")  # even with a ticket
        with sock:
            sock.sendall(request)
            sock.settimeout(3)
            assert sock.recv(64).startswith(b"HTTP/1.1 503"), "closed unread, with a bare 503"
        sock, request = _request(server, authorised=True, source="127.0.0.32")
        with sock:
            sock.sendall(request)
            sock.settimeout(3)
            assert sock.recv(64).startswith(b"HTTP/1.1 200"), "another address is served"


def _get_status_from(server: PeerServer, source: str) -> int:
    sock, request = _request(server, authorised=False, source=source)
    with sock:
        sock.sendall(request)
        sock.settimeout(5)
        return int(sock.recv(64).split()[1])


def test_a_request_head_past_its_bound_is_closed_unanswered(server: PeerServer) -> None:
    """The standard library buffers 100 header lines of 64 KiB each: a few callers without a
    ticket grew the agent by ~1 GiB. A head past HEAD_BYTES is cut off instead."""
    from agent.peer.server import HEAD_BYTES

    path = f"/v1/peer/{server.swarm.digest}/{'0' * 64}"
    big = f"GET {path} HTTP/1.1\r\n".encode() + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(HEAD_BYTES // 1000 + 2)
    )
    assert _answers(server, big + b"\r\n") == b"", "closed, nothing parsed or answered"
    ok = f"GET {path} HTTP/1.1\r\nX-Pad: {'a' * 4000}\r\nConnection: close\r\n\r\n".encode()
    assert _answers(server, ok).startswith(b"HTTP/1.1 401"), "a head within the bound is read"
    dup = f"GET {path} HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n".encode()
    assert _answers(server, dup + b"GET / HTTP/1.1\r\n\r\n").count(b"HTTP/1.1 ") == 1, (
        "two Content-Lengths: the connection closes, its 'body' is never a request"
    )


def test_close_ends_the_connections_it_serves_before_it_returns(image: tuple[Path, Manifest, str]) -> None:
    """A kept connection went on being served after close(): its thread then read the target's
    descriptor after the deploy had closed it (and the number was another file's)."""
    src, manifest, digest = image
    fd = os.open(src, os.O_RDONLY)
    swarm = Swarm(
        manifest, digest, "j-000000000001", lambda m: AnnounceReply(PeerGrant(0, "00" * 32, "t", 0.0))
    )
    for chunk in manifest:
        swarm.have.add(chunk.index)
    swarm.keys[ticket.key_name("00000000", 0)] = KEY
    server = PeerServer(swarm, fd, "127.0.0.1", 0, ServeLimits(timeout=30.0), log=lambda _: None).start()
    sock, request = _request(server, authorised=True)
    try:
        sock.sendall(request)
        sock.settimeout(5)
        got = b""
        while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + manifest.chunk(0).length:
            got += sock.recv(1 << 20)
        assert got.startswith(b"HTTP/1.1 200") and b"Connection: close" not in got.split(b"\r\n\r\n")[0]
        assert settle(lambda: len(server.live) == 1), "the kept connection waits for its next request"
        t0 = time.monotonic()
        server.close()
        assert time.monotonic() - t0 < 3.0 and not server.live and server.open == 0
        assert closed_within(sock, 1.0), "closed by close(), not by the 30-s idle timeout"
    finally:
        sock.close()
        os.close(fd)


@pytest.mark.parametrize("skew", [7200.0, -7200.0])
def test_tickets_expire_by_the_controller_s_clock_not_the_agent_s(
    image: tuple[Path, Manifest, str], skew: float
) -> None:
    # a live image's clock may be hours off (no RTC, no NTP): each announce teaches the offset
    src, manifest, digest = image

    def agent_clock() -> float:
        return time.time() + skew

    grant = PeerGrant(0, KEY.hex(), "t", 0.0, now=time.time())
    swarm = Swarm(manifest, digest, "j-000000000001", lambda m: AnnounceReply(grant), clock=agent_clock)
    swarm.announce()
    for chunk in manifest:
        swarm.have.add(chunk.index)
    fd = os.open(src, os.O_RDONLY)
    server = PeerServer(swarm, fd, "127.0.0.1", 0, log=lambda _: None, clock=agent_clock).start()
    try:
        for expires, status in ((time.time() + 600, 200), (time.time() - 60, 403)):
            text = ticket.encode(ticket.Ticket(digest, "m-00000000000b", 0, int(expires)), KEY)
            assert _get_status(server, authorised=True, text=text) == status, (skew, expires)
    finally:
        server.close()
        os.close(fd)


def test_a_peer_with_every_connection_taken_is_busy_not_dropped(
    server: PeerServer, image: tuple[Path, Manifest, str]
) -> None:
    _, manifest, digest = image
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]  # the cap
    try:
        time.sleep(0.1)
        url = f"http://127.0.0.1:{server.port}"
        swarm = swarm_with(url, manifest, digest)
        source = PeerSource(swarm, PeerOptions(timeout=1.0, patience=30.0, max_wait=0.2))
        thread, out = fetch_in_thread(source, manifest, 1)
        thread.join(5)
        assert isinstance(out[0], FetchError) and out[0].missing
        assert url not in swarm.dropped, swarm.dropped
        assert server.stats.busy >= 1
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_deadline_socket_reads_freely_without_a_deadline_and_not_past_one(timeout: float | None) -> None:
    from agent.peer.deadline import DeadlineSocket

    mine, theirs = socket.socketpair()
    mine.settimeout(timeout)
    with DeadlineSocket.of(mine) as sock, theirs, sock.makefile("rb") as reader:
        theirs.sendall(b"hi")
        assert reader.read1(10) == b"hi"  # no deadline set: as a plain socket, blocking or not
        sock.within(0.3, "a test answer")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"expected a test answer within 0\.3 s"):
            reader.read1(10)
        assert time.monotonic() - t0 < 1.0 and sock.gettimeout() == timeout
