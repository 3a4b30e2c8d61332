"""Kept connections between a peer source and a peer server (HTTP/1.1 keep-alive), on 127.0.0.1.

A new connection per chunk paid a handshake and TCP's slow start on every chunk; the source keeps a
few idle connections a peer for its next requests, and the server keeps them open unless crowded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.image.manifest import Manifest
from agent.peer import ticket
from agent.peer.bitmap import Have
from agent.peer.server import PeerServer, ServeLimits
from agent.peer.source import PeerOptions, PeerSource
from agent.peer.swarm import Swarm
from agent.protocol import AnnounceReply, PeerGrant, PeerInfo
from agent.writer.errors import FetchError
from tests.images import MiB, random_image
from tests.peerkit import KEY, holding_all, settle
from tests.stores import import_store

FAST = PeerOptions(timeout=2.0, patience=30.0, max_wait=0.3, busy_backoff=0.05, max_backoff=0.05)


class CountingServer(PeerServer):
    """Counts the connections it accepted, and where they came from."""

    accepted = 0
    came_from: tuple[str, ...] = ()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        self.accepted += 1
        self.came_from += (addr[0],)
        return conn, addr


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Manifest, str]:
    src = random_image(tmp_path / "src.img", 6 * MiB, seed=5)
    _, manifest, digest = import_store(tmp_path / "store", src)
    return src, manifest, digest


def serving(
    image: tuple[Path, Manifest, str], limits: ServeLimits
) -> contextlib.AbstractContextManager[CountingServer]:
    return holding_all(*image, limits, CountingServer)


def fetcher(port: int, manifest: Manifest, digest: str, options: PeerOptions) -> tuple[PeerSource, str]:
    """A peer source whose one peer listens on `port`; chunk 0 is its origin share, the rest the peer's."""
    url = f"http://127.0.0.1:{port}"
    full = Have(len(manifest))
    full.bits = (1 << len(manifest)) - 1
    text = ticket.encode(ticket.Ticket(digest, "m-00000000000b", 0, 10**11), KEY)
    grant = PeerGrant(0, KEY.hex(), text, 1e11)
    reply = AnnounceReply(grant, (PeerInfo("m-00000000000e", url, full.encode(), True),), seed_of=1000)
    swarm = Swarm(manifest, digest, "j-000000000002", lambda m: reply)
    swarm.announce()
    return PeerSource(swarm, options), url


def fetch(source: PeerSource, src: Path, manifest: Manifest, index: int) -> None:
    chunk = manifest.chunk(index)
    buf = memoryview(bytearray(chunk.length))
    assert source.fetch_into(chunk, buf) == chunk.length
    with open(src, "rb") as f:
        f.seek(chunk.offset)
        assert bytes(buf) == f.read(chunk.length), f"chunk {index}: bytes differ from the image"


def test_one_connection_carries_a_peer_s_chunks_and_its_busy_answers(
    image: tuple[Path, Manifest, str],
) -> None:
    src, manifest, digest = image
    with serving(image, ServeLimits(uploads=1, queue=0)) as server:  # no waiting: 503 at once
        source, url = fetcher(server.port, manifest, digest, FAST)
        for index in (1, 2, 3):
            fetch(source, src, manifest, index)
        # its one upload slot taken: it answers 503 (taken once the handler of chunk 3 gave it back,
        # after its last write, which the source may have read whole before that)
        assert settle(lambda: server.gate.enter(0, may_wait=False))
        try:
            with pytest.raises(FetchError) as got:
                fetch(source, src, manifest, 4)
            assert got.value.missing
            assert server.stats.busy >= 1
        finally:
            server.gate.leave()
        time.sleep(0.1)  # the busy peer's back-off (0.05 s) ends
        source.swarm.announce()  # and the tracker says again that it holds chunk 4
        fetch(source, src, manifest, 4)
        assert (source.connections, server.accepted) == (1, 1), "each request opened a connection"
        assert url not in source.swarm.dropped
        source.close()


def test_the_server_sends_each_answer_on_a_kept_connection_without_nagle_s_delay(
    image: tuple[Path, Manifest, str],
) -> None:
    """An answer's head and body are two writes: with Nagle's algorithm on, the second waited for the
    caller's delayed ACK, and every 503 or 404 on a kept connection took ~44 ms instead of ~0.4."""
    src, manifest, digest = image
    with serving(image, ServeLimits(uploads=1, queue=0)) as server:
        source, _ = fetcher(server.port, manifest, digest, FAST)
        fetch(source, src, manifest, 1)  # the connection is kept, its handler waits for the next request
        assert settle(lambda: len(server.live) == 1)
        (sock,) = server.live.values()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), "Nagle is on for kept connections"
        source.close()


def test_a_connection_the_peer_closed_while_idle_is_replaced_without_a_strike(
    image: tuple[Path, Manifest, str],
) -> None:
    src, manifest, digest = image
    # the peer cuts a connection idle for 0.3 s; this source would keep it 5 s
    with serving(image, ServeLimits(timeout=0.3)) as server:
        source, url = fetcher(server.port, manifest, digest, PeerOptions(timeout=2.0, keepalive=5.0))
        fetch(source, src, manifest, 1)
        assert settle(lambda: server.open == 0), "the server kept an idle connection past its timeout"
        fetch(source, src, manifest, 2)  # the kept one is closed: one try on it, then a new one
        assert (source.connections, server.accepted) == (2, 2)
        assert url not in source.swarm.dropped and not source.swarm.busy, "the peer was held to blame"
        source.close()


def test_a_crowded_server_closes_each_connection_after_its_answer(image: tuple[Path, Manifest, str]) -> None:
    src, manifest, digest = image
    with serving(image, ServeLimits(keepalive=0)) as server:
        source, _ = fetcher(server.port, manifest, digest, FAST)
        for index in (1, 2, 3):
            fetch(source, src, manifest, index)
        assert (source.connections, server.accepted) == (3, 3)
        assert settle(lambda: server.open == 0), "closed connections still count as open"
        source.close()


def test_kept_connections_end_with_the_source_with_a_dropped_peer_and_after_keepalive(
    image: tuple[Path, Manifest, str],
) -> None:
    src, manifest, digest = image
    with serving(image, ServeLimits()) as server:
        source, url = fetcher(server.port, manifest, digest, PeerOptions(timeout=2.0, keepalive=0.3))
        fetch(source, src, manifest, 1)
        assert server.open == 1
        source.close()
        assert settle(lambda: server.open == 0), "the source's close left its idle connection open"

        source, url = fetcher(server.port, manifest, digest, PeerOptions(timeout=2.0, keepalive=0.3))
        fetch(source, src, manifest, 1)
        time.sleep(0.4)  # idle past keepalive: not used again
        fetch(source, src, manifest, 2)
        assert source.connections == 2
        source.swarm.drop(url, "a test drops it")
        source._checkout("http://127.0.0.1:9")  # any request prunes what leads to a dropped peer
        assert settle(lambda: server.open == 0), "a dropped peer's idle connection is still open"
        source.close()


def test_a_refusal_whose_body_stalls_costs_its_connection_not_the_peer(
    image: tuple[Path, Manifest, str],
) -> None:
    _, manifest, digest = image
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\n")  # and never the body
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        source, url = fetcher(port, manifest, digest, PeerOptions(timeout=5.0, patience=30.0, max_wait=0.3))
        t0 = time.monotonic()
        with pytest.raises(FetchError) as got:
            source.fetch_into(manifest.chunk(1), memoryview(bytearray(manifest.chunk(1).length)))
        assert got.value.missing
        assert time.monotonic() - t0 < 3.0, "waited out the socket timeout for a refusal's body"
        assert url not in source.swarm.dropped, "a busy answer dropped the peer"
        source.close()
    finally:
        listener.close()
        for c in held:
            c.close()


def test_connections_come_from_the_source_address_it_is_given(image: tuple[Path, Manifest, str]) -> None:
    # the simulated fleet gives each agent its own loopback address, as real agents have their own:
    # peers count connections per address
    src, manifest, digest = image
    with serving(image, ServeLimits()) as server:
        source, _ = fetcher(server.port, manifest, digest, replace(FAST, source_address="127.0.0.3"))
        fetch(source, src, manifest, 1)
        source.close()
        assert server.came_from == ("127.0.0.3",)
        plain, _ = fetcher(server.port, manifest, digest, FAST)
        fetch(plain, src, manifest, 2)
        plain.close()
        assert server.came_from == ("127.0.0.3", "127.0.0.1")


def test_the_server_starts_without_looking_its_address_up_in_dns(
    image: tuple[Path, Manifest, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # http.server's own server_bind asks socket.getfqdn for a name nothing uses: a reverse DNS query
    # at every deploy's start, 5 s when the resolver does not answer (100 agents on 127.1.0.x here)
    asked: list[str] = []
    monkeypatch.setattr(socket, "getfqdn", lambda name="": asked.append(name) or name)
    monkeypatch.setattr(socket, "gethostbyaddr", lambda name: asked.append(name) or (name, [], [name]))
    src, manifest, digest = image
    with serving(image, ServeLimits()) as server:
        source, _ = fetcher(server.port, manifest, digest, FAST)
        fetch(source, src, manifest, 1)
        source.close()
    assert asked == []
