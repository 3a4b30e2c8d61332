"""Chunk sources against servers that misbehave at the protocol level (raw sockets on 127.0.0.1):
every exchange ends within its deadline, the ordinary web's habits (redirects, Retry-After,
Early Hints, idle keep-alives closed, signed URLs) work, and a cancel aborts what is in flight."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from agent.image.manifest import Manifest
from agent.writer.device import open_target
from agent.writer.errors import BadManifest, Cancelled, FetchError, ManifestUnavailable
from agent.writer.events import Event, SourceFailed
from agent.writer.fetch import RetryPolicy
from agent.writer.load import load_manifest
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.sources import ChunkSource, HttpSource, Timeouts
from tests.images import MiB, random_bytes, write_image
from tests.rawserver import RawServer, raw_server
from tests.stores import import_store

T = Timeouts(connect=2.0, stall=0.5, min_rate=1 << 20)  # a 1 MiB chunk: 1.5 s for the whole exchange
SLACK = 1.5  # the watchdog looks every 0.1 s; a loaded CI machine adds more


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest, str, bytes]:
    data = random_bytes(2 * MiB, 31)
    src = write_image(tmp_path / "img.raw", 2 * MiB, [(0, data)])
    root, manifest, digest = import_store(tmp_path / "store", src, "h")
    return root, manifest, digest, data


def ok_response(server: RawServer, conn: socket.socket, line: str, extra: bytes = b"") -> None:
    body = server.file_for(line)
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def keep_serving(server: RawServer, conn: socket.socket) -> None:
    while (line := server.read_request(conn)) is not None:
        ok_response(server, conn, line)


def fetch_one(url: str, manifest: Manifest) -> tuple[float, str]:
    """Fetch chunk 0; (seconds, "ok" or the FetchError's message)."""
    source = HttpSource(url, T)
    chunk = manifest.chunk(0)
    buf = memoryview(bytearray(chunk.stored_len))
    t0 = time.monotonic()
    try:
        source.fetch_into(chunk, buf)
        return time.monotonic() - t0, "ok"
    except FetchError as exc:
        return time.monotonic() - t0, str(exc)
    finally:
        source.close()


def continue_flood(server: RawServer, conn: socket.socket) -> None:
    server.read_request(conn)
    while server.alive():  # every line arrives at once: no stall ever fires
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.01)


def trickled_headers(server: RawServer, conn: socket.socket) -> None:
    server.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    server.trickle(conn, b"X" * 10_000)  # a header line that never ends, a byte at a time


def endless_trailers(server: RawServer, conn: socket.socket) -> None:
    line = server.read_request(conn)
    assert line is not None
    body = server.file_for(line)
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.sendall(b"%x\r\n" % len(body) + body + b"\r\n0\r\n")
    server.trickle(conn, b"X-Trailer: 1\r\n" * 1000, step=14)


def close_delimited_trickle(server: RawServer, conn: socket.socket) -> None:
    line = server.read_request(conn)
    assert line is not None
    body = server.file_for(line)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    server.trickle(conn, body, step=4096)  # 20 KB/s: a 1 MiB chunk would take a minute


def slow_error_body(server: RawServer, conn: socket.socket) -> None:
    server.read_request(conn)
    conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 4096\r\n\r\n")
    server.trickle(conn, b"x" * 4096)


@pytest.mark.parametrize(
    "handler",
    [continue_flood, trickled_headers, endless_trailers, close_delimited_trickle, slow_error_body],
    ids=lambda h: h.__name__,
)
def test_every_exchange_ends_within_its_deadline(
    store: tuple[Path, Manifest, str, bytes], handler: object
) -> None:
    root, manifest, _, _ = store
    with raw_server(handler, root) as server:  # type: ignore[arg-type]
        seconds, outcome = fetch_one(server.url, manifest)
    assert outcome != "ok"
    assert seconds < T.deadline(MiB) + SLACK, outcome
    if handler is slow_error_body:
        assert "HTTP 503" in outcome  # answered at once: an error's body is never read
    else:
        assert "too slow" in outcome and "chunks/" in outcome


def test_manifest_download_from_a_trickling_http10_server_is_cut(
    store: tuple[Path, Manifest, str, bytes],
) -> None:
    root, _, digest, _ = store

    def handler(server: RawServer, conn: socket.socket) -> None:
        line = server.read_request(conn)
        assert line is not None
        body = server.file_for(line)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        server.trickle(conn, body, step=16)

    with raw_server(handler, root) as server:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="too slow"):
            load_manifest(f"{server.url}/manifests/{digest}", [], T)
    # the budget follows the declared length (a few KiB), not the 96 MiB manifest limit
    assert time.monotonic() - t0 < T.stall + 1 + SLACK


def test_a_keepalive_closed_while_idle_is_retried_on_a_fresh_connection(
    store: tuple[Path, Manifest, str, bytes],
) -> None:
    root, manifest, _, _ = store

    def one_then_close(server: RawServer, conn: socket.socket) -> None:
        line = server.read_request(conn)
        if line is not None:
            ok_response(server, conn, line)  # keep-alive by default... then the server drops it idle

    with raw_server(one_then_close, root) as server:
        source = HttpSource(server.url, T)
        try:
            bufs = [memoryview(bytearray(c.stored_len)) for c in manifest]
            source.fetch_into(manifest.chunk(0), bufs[0])
            time.sleep(0.2)  # the server has closed the connection by now
            source.fetch_into(manifest.chunk(1), bufs[1])
        finally:
            source.close()
    assert server.connections == 2 and len(server.requests) == 2


def test_redirects_are_followed_with_the_query_and_loops_refused(
    store: tuple[Path, Manifest, str, bytes],
) -> None:
    root, manifest, _, _data = store

    def mirror(server: RawServer, conn: socket.socket) -> None:
        while (line := server.read_request(conn)) is not None:
            path = line.split()[1]
            if path.startswith("/cdn/"):
                ok_response(server, conn, line.replace("/cdn/", "/", 1))
            elif path.startswith("/loop/"):
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /loop/again\r\nContent-Length: 0\r\n\r\n")
            else:
                location = "/cdn" + path
                conn.sendall(
                    b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location.encode()
                )

    with raw_server(mirror, root) as server:
        _seconds, outcome = fetch_one(server.url + "/?token=s3cret", manifest)
        assert outcome == "ok"
        assert server.requests[0].split()[1].endswith("?token=s3cret")
        assert server.requests[1].split()[1].startswith("/cdn/chunks/")
        assert server.requests[1].split()[1].endswith("?token=s3cret")
        _, outcome = fetch_one(server.url + "/loop", manifest)
    assert "more than 5 redirects" in outcome


def test_early_hints_are_skipped(store: tuple[Path, Manifest, str, bytes]) -> None:
    root, manifest, _, _ = store

    def hints(server: RawServer, conn: socket.socket) -> None:
        while (line := server.read_request(conn)) is not None:
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
            ok_response(server, conn, line)

    with raw_server(hints, root) as server:
        _, outcome = fetch_one(server.url, manifest)
    assert outcome == "ok"


def write_file(
    manifest: Manifest, digest: str, sources: list[ChunkSource], dest: Path, **kw: object
) -> object:
    target = open_target(str(dest), manifest.image_size)
    try:
        return Writer(manifest, digest, sources, target, **kw).run()  # type: ignore[arg-type]
    finally:
        target.close()
        for s in sources:
            s.close()


def test_retry_after_is_honoured(tmp_path: Path, store: tuple[Path, Manifest, str, bytes]) -> None:
    root, manifest, digest, data = store
    shed_until = time.monotonic() + 1.0

    def shedding(server: RawServer, conn: socket.socket) -> None:
        while (line := server.read_request(conn)) is not None:
            if time.monotonic() < shed_until:
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            else:
                ok_response(server, conn, line)

    dest = tmp_path / "out.img"
    options = WriteOptions(workers=1, retry=RetryPolicy(retries=2, backoff=0.01))
    with raw_server(shedding, root) as server:
        write_file(manifest, digest, [HttpSource(server.url, T)], dest, options=options)
    assert dest.read_bytes() == data  # backoff alone (0.01 s) would have spent both rounds at once


def test_cancel_aborts_a_request_stuck_on_the_server(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes]
) -> None:
    root, manifest, digest, _ = store
    patient = Timeouts(connect=2.0, stall=30.0, min_rate=1 << 20)  # nothing would cut it for 30 s
    cancel = threading.Event()
    seen: list[Event] = []

    def silent(server: RawServer, conn: socket.socket) -> None:
        server.read_request(conn)
        while server.alive():
            time.sleep(0.05)

    dest = tmp_path / "out.img"
    with raw_server(silent, root) as server:
        threading.Timer(0.5, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            write_file(
                manifest,
                digest,
                [HttpSource(server.url, patient)],
                dest,
                options=WriteOptions(workers=2),
                listener=seen.append,
                cancel=cancel,
            )
        elapsed = time.monotonic() - t0
    assert elapsed < 0.5 + SLACK
    assert not [e for e in seen if isinstance(e, SourceFailed)]  # a cancel is not the source's failure
    assert dest.read_bytes() == bytes(manifest.image_size)


@pytest.mark.parametrize(
    "spelling",
    [
        str.upper,
        lambda d: d + "/",
        lambda d: "%" + format(ord(d[0]), "02X") + d[1:],
        lambda d: d + "%2F",
        lambda d: d + "/.",
        lambda d: d + ";v=1",
        lambda d: d + "%20",
    ],
    ids=["upper-case", "trailing-slash", "percent-encoded", "encoded-slash", "dot", "params", "blank"],
)
def test_any_spelling_of_a_digest_pins_the_manifest(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes], spelling: object
) -> None:
    root, _, digest, _ = store
    other = tmp_path / "other.raw"
    write_image(other, MiB, [(0, random_bytes(MiB, 99))])
    other_root, _, forged = import_store(tmp_path / "other-store", other, "forged")
    forged_bytes = (other_root / "manifests" / forged).read_bytes()

    def attacker(server: RawServer, conn: socket.socket) -> None:  # the same manifest for any path
        while server.read_request(conn) is not None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(forged_bytes) + forged_bytes)

    with raw_server(attacker, root) as server:
        url = f"{server.url}/manifests/{spelling(digest)}"  # type: ignore[operator]
        with pytest.raises(BadManifest, match=f"expected blake3 {digest}"):
            load_manifest(url, [], T)
        # a URL that does not name the digest is pinned by --digest
        with pytest.raises(BadManifest, match=f"expected blake3 {digest}"):
            load_manifest(f"{server.url}/latest.manifest", [], T, expect=digest.upper())
        assert load_manifest(f"{server.url}/latest.manifest", [], T, expect=forged).pinned


def test_garbage_from_a_server_is_a_failed_attempt_not_a_crash(
    tmp_path: Path, store: tuple[Path, Manifest, str, bytes]
) -> None:
    """Odd header values (a superscript Retry-After, a Location no URL parser takes) fail that
    source's attempt cleanly: the next source serves the chunk and the write completes."""
    root, manifest, digest, data = store
    answers = [
        b"HTTP/1.1 503 Busy\r\nRetry-After: \xc2\xb2\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://[::1/x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
    ]

    def odd(server: RawServer, conn: socket.socket) -> None:
        while server.read_request(conn) is not None:
            conn.sendall(answers[len(server.requests) % len(answers)])

    def good(server: RawServer, conn: socket.socket) -> None:
        keep_serving(server, conn)

    dest = tmp_path / "out.img"
    seen: list[Event] = []
    options = WriteOptions(workers=1, retry=RetryPolicy(retries=1))
    with raw_server(odd, root) as bad, raw_server(good, root) as mirror:
        sources: list[ChunkSource] = [HttpSource(bad.url, T), HttpSource(mirror.url, T)]
        write_file(manifest, digest, sources, dest, options=options, listener=seen.append)
    assert dest.read_bytes() == data
    errors = [e.error for e in seen if isinstance(e, SourceFailed)]
    assert errors and all(e.startswith("GET chunks/") for e in errors), errors


def test_a_stall_inside_headers_is_a_stall_not_bad_bytes(store: tuple[Path, Manifest, str, bytes]) -> None:
    root, manifest, _, _ = store

    def half_header(server: RawServer, conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10")  # ... and the rest never comes
        while server.alive():
            time.sleep(0.05)

    with raw_server(half_header, root) as server:
        source = HttpSource(server.url, T)
        chunk = manifest.chunk(0)
        try:
            with pytest.raises(FetchError) as caught:
                source.fetch_into(chunk, memoryview(bytearray(chunk.stored_len)))
        finally:
            source.close()
    assert not caught.value.bad_bytes  # a slow network is not a lying source (3 strikes drop one)
    assert "stalled" in str(caught.value) or "too slow" in str(caught.value)


def test_a_manifest_stalled_after_its_headers_is_unavailable_not_bad(
    store: tuple[Path, Manifest, str, bytes],
) -> None:
    root, _, digest, _ = store

    def half_manifest(server: RawServer, conn: socket.socket) -> None:
        line = server.read_request(conn)
        assert line is not None
        body = server.file_for(line)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + body[: len(body) // 2])  # close-delimited, then silence
        while server.alive():
            time.sleep(0.05)

    with raw_server(half_manifest, root) as server, pytest.raises(ManifestUnavailable) as caught:
        load_manifest(f"{server.url}/manifests/{digest}", [], T)
    assert not isinstance(caught.value, BadManifest)  # a deploy retries an unavailable manifest
    assert "stalled" in str(caught.value) or "too slow" in str(caught.value)


def test_a_source_used_after_close_opens_a_fresh_timed_connection(
    store: tuple[Path, Manifest, str, bytes],
) -> None:
    root, manifest, _, _ = store
    with raw_server(keep_serving, root) as server:
        source = HttpSource(server.url, T)
        chunk = manifest.chunk(0)
        try:
            source.fetch_into(chunk, memoryview(bytearray(chunk.stored_len)))
            source.close()
            source.fetch_into(chunk, memoryview(bytearray(chunk.stored_len)))
        finally:
            source.close()
    assert server.connections == 2
