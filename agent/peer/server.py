"""The peer server: serves the chunks this agent verified, to callers with a ticket for the image.

GET /v1/peer/<manifest digest>/<chunk blake3> with `Authorization: Ticket <ticket>`. The path is
matched whole against hex patterns and looked up in the swarm's bitmap: no part of a request
reaches the filesystem. The bytes are read back from the target at the chunk's offset and hashed
again before they go out (a disk that changed under us serves nothing wrong): one extra read of
each served chunk and one blake3 (~5 GB/s a core), and memory of one chunk per upload slot.
Uploads are capped in number (more get 503 with Retry-After) and in bytes/s (a token bucket
shared by all of them), so the agent's own deploy keeps its share of the link and the disk.
Connections are kept between a caller's requests (HTTP/1.1) while at most `keepalive` are open,
each for at most `timeout` idle; at most `connections` are open at once, `per_address` of them from
one address.
A request without a ticket gets 401, one with a ticket that does not verify 403; both are logged.
A ticket under a key this agent was not handed yet gets 403 with `X-Sledge-Key: unknown`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import blake3

from agent.peer import ticket
from agent.peer.bucket import TokenBucket
from agent.peer.deadline import DeadlineSocket, TooLarge
from agent.peer.errors import KeyUnknown, TicketInvalid
from agent.peer.gate import UploadGate
from agent.peer.rates import Callers, Rates
from agent.peer.swarm import Swarm

PEER_PATH = "/v1/peer/"
_PATH = re.compile(r"/v1/peer/([0-9a-f]{64})/([0-9a-f]{64})")
# an upload is paced (ServeLimits.rate) and written in steps of this: a step is a burst into the
# link's queue, and 256 KiB ones (more than a capped link queues) ran real transfers at 0.89 of their
# fair share at p50, 64 KiB ones at 1.01 (the real fleet case, docs/peers.md); and each token bucket
# in a chain (upload cap, download cap) held a step back: a 2-s chunk took 2.25 s in section G
SLICE = 64 << 10
ACCEPT_POLL = 5.0  # seconds: a bound on the accepting thread's wait (close() wakes it at once)
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
# a request's line and headers: an agent's are under 1 KiB; the standard library's own bounds (100
# lines of 64 KiB) let each of a few connections without a ticket buffer 6 MiB a request (the agent's
# memory grew by ~1 GiB under such a flood, in a live image that runs from RAM)
HEAD_BYTES = 8 << 10
KEY_HEADER = "X-Sledge-Key"  # "unknown": the ticket's key is not (yet) known here
HELD_HEADER = "X-Sledge-Held"  # how many chunks the caller holds: the neediest is served first


@dataclass(frozen=True)
class ServeLimits:
    uploads: int = 1  # concurrent uploads: one, at the whole link (a chunk served
    # sooner is held, and served on, sooner)
    rate: float = 0.0  # bytes/s over all uploads; 0: no cap
    # a caller silent this long (reading, or idle between requests) is cut off, and so is one whose
    # request has not come whole this long after it connected or had its last answer
    timeout: float = 10.0
    connections: int = 32  # open connections (one thread each); more are closed at once
    # open connections from one address: an agent holds one or two to a peer (its fetch, and a kept
    # one); a host alone cannot take all `connections` and keep the fleet's asks out
    per_address: int = 4
    # open connections past which an answer closes its connection instead of keeping it for the
    # caller's next request: idle keep-alive connections never take the last slots from new callers
    keepalive: int = 16
    upload_seconds: float = 60.0  # the longest one upload may take (on top of its share of `rate`)
    # callers that find the slots full wait this many at most, this long at most, for the next free
    # slot, which goes to the one that holds the fewest chunks (agent.peer.gate); the rest get 503
    queue: int = 4
    queue_wait: float = 2.0  # below the callers' socket timeout (PeerOptions.timeout)
    # refused requests (no ticket, a bad one, not a peer path) from one address in a minute, past
    # which its connections are closed at once, unread: every refusal closes its connection too, so
    # a caller without a ticket cannot keep a parser busy in the agent's process (a flood of them on
    # kept connections slowed the agent's own write 16x)
    refusals: int = 60


@dataclass
class ServeStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    served_bytes: int = 0
    served_chunks: int = 0
    refused: int = 0  # 401/403
    busy: int = 0  # 503


class RefusalLog:
    """Refusals are logged (each line is a job event the controller stores), but at most `first`
    per caller IP a minute; the rest are counted and the count logged when the minute is over, so a
    caller looping on refused requests cannot flood the controller's event log."""

    def __init__(self, first: int = 5, window: float = 60.0, max_callers: int = 4096) -> None:
        self.first, self.window, self.max_callers = first, window, max_callers
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[float, int]] = {}  # ip -> (its minute's start, refusals in it)

    def count(self, ip: str, now: float) -> int:
        """Refusals of `ip` in its current minute."""
        with self.lock:
            start, count = self.seen.get(ip, (now, 0))
        return count if now - start < self.window else 0

    def note(self, ip: str, what: str, now: float) -> list[str]:
        """The lines to log for one refusal of `ip` (none once it is past `first` this minute)."""
        lines = []
        with self.lock:
            start, count = self.seen.get(ip, (now, 0))
            if now - start >= self.window:
                if count > self.first:
                    lines.append(
                        f"peer server: {count - self.first} more refusals of {ip} in "
                        f"{self.window:.0f} s were not logged"
                    )
                start, count = now, 0
            count += 1
            if ip not in self.seen and len(self.seen) >= self.max_callers:
                self.seen.clear()  # bounded memory; a forgotten caller starts a new minute
            self.seen[ip] = (start, count)
        if count <= self.first:
            lines.append(f"peer server: refused {ip} {what}")
        if count == self.first:
            lines.append(f"peer server: further refusals of {ip} this minute are counted, not logged")
        return lines


def held_of(text: str, chunks: int) -> int:
    """The caller's X-Sledge-Held: a count of chunks; anything else ranks it last (`chunks`)."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return chunks
    return min(int(text), chunks)


class _Handler(BaseHTTPRequestHandler):
    server: PeerServer
    protocol_version = "HTTP/1.1"
    holder = ""  # the machine the request's ticket names, once it verified
    # TCP_NODELAY: an answer's head and its body go out as two writes, and on a kept connection
    # Nagle held the second until the caller's delayed ACK, 40 ms later: every 503 or 404 on a kept
    # connection took 44 ms instead of 0.4 (2,000 asks through PeerSource on 127.0.0.1)
    disable_nagle_algorithm = True

    def setup(self) -> None:
        # the timeout covers the request line and headers too: a caller that opens a connection and
        # says nothing (slowloris) is cut off after limits.timeout instead of holding a thread forever
        self.request.settimeout(self.server.limits.timeout)
        super().setup()

    def handle_one_request(self) -> None:
        if self.server.stop_event.is_set():  # the server closes: no more requests on kept connections
            self.close_connection = True
            return
        # ... and one that trickles it a byte at a time, each within the timeout, is cut off too, as
        # is one whose line and headers run past HEAD_BYTES
        cast(DeadlineSocket, self.request).within(self.server.limits.timeout, "a whole request", HEAD_BYTES)
        try:
            super().handle_one_request()
        except TooLarge:
            self.close_connection = True  # closed unanswered, like a request that timed out

    def log_message(self, format: str, *args: object) -> None:
        pass  # refusals are logged on purpose below; the rest is not worth a line

    def _reply(
        self, status: int, text: str, extra: dict[str, str] | None = None, close: bool = False
    ) -> None:
        if close:
            self.close_connection = True
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self) -> None:
        # HTTP/1.1 keeps the connection for the caller's next request (a new one per chunk paid a
        # handshake and TCP's slow start each time), unless many are open
        if self.close_connection or self.server.crowded():
            self.send_header("Connection", "close")  # also makes the handler close it after
        super().end_headers()

    def do_GET(self) -> None:
        lengths = self.headers.get_all("Content-Length") or ["0"]
        if len(lengths) > 1 or lengths[0].strip() != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # its body is not read: it is no request of the caller's
        self.server.serve_chunk(self)

    def do_POST(self) -> None:
        self.close_connection = True  # as in do_GET
        self._reply(405, "only GET\n", {"Allow": "GET"})

    do_PUT = do_DELETE = do_HEAD = do_POST


class PeerServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        swarm: Swarm,
        fd: int,
        host: str = "0.0.0.0",
        port: int = 0,
        limits: ServeLimits = ServeLimits(),
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.swarm = swarm
        self.fd = fd
        self.limits = limits
        self.log = log
        self.clock = clock
        self.gate = UploadGate(limits.uploads, limits.queue, limits.queue_wait)
        self.rates = Rates()  # this server's recent uploads
        self.callers = Callers()  # each caller's last upload: one that reads slowly is not queued
        self.conns = threading.BoundedSemaphore(limits.connections)
        self.bucket = TokenBucket(limits.rate)
        self.stats = ServeStats()
        # connections open now from each address (each holds one of `conns`)
        self.by_address: dict[str, int] = {}
        self._open_lock = threading.Lock()
        self.refusals = RefusalLog()
        self.stop_event = threading.Event()
        # the connections being handled, by their threads: close() ends them before it returns, so
        # that none reads the target after the deploy closed it (and its descriptor was reused)
        self.live: dict[threading.Thread, Any] = {}
        self.port = self.server_address[1]
        swarm.port = self.port
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:
        # HTTPServer's own also looks its address up in reverse (socket.getfqdn), for a name nothing
        # here uses: a DNS query from the live image at every deploy's start, and 5 s lost to the
        # resolver's timeout when it does not answer (the simulated fleet's agents started 5 s late)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> tuple[Any, Any]:
        conn, addr = super().get_request()
        return DeadlineSocket.of(conn), addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a caller that hangs up (it dropped us, or was cancelled) is no error of ours

    def process_request(self, request: Any, client_address: Any) -> None:
        # a cap on connections, not only on uploads: each one is a thread and a file descriptor
        ip = str(client_address[0])
        turned = self._admit(ip)
        if turned is not None:
            self._turn_away(request, ip, turned)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed(ip)
            raise

    def _admit(self, ip: str) -> str | None:
        """Take a connection slot for `ip`: None once taken, else why not ("" when every slot is
        taken: nothing of `ip`'s own to log)."""
        if self.refusals.count(ip, time.monotonic()) >= self.limits.refusals:
            return f"refused {self.limits.refusals} times this minute: its connections are closed unread"
        with self._open_lock:
            mine = self.by_address.get(ip, 0)
            if mine >= self.limits.per_address:
                return f"{mine} connections open from it, at most {self.limits.per_address} per address"
            if not self.conns.acquire(blocking=False):
                return ""
            self.by_address[ip] = mine + 1
            return None

    def _turn_away(self, request: Any, ip: str, why: str) -> None:
        """A bare 503 and close: every connection slot is taken, or `ip` may have none (`why`)."""
        with self.stats.lock:
            self.stats.busy += 1
        if why:
            for line in self.refusals.note(ip, f"(503) {why}", time.monotonic()):
                self.log(line)
        try:  # a few bytes into an empty send buffer: never blocks the accepting thread
            request.setblocking(False)
            request.send(_FULL)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        me = threading.current_thread()
        with self._open_lock:
            self.live[me] = request
        try:
            if not self.stop_event.is_set():
                super().process_request_thread(request, client_address)
            else:
                self.shutdown_request(request)
        finally:
            with self._open_lock:
                self.live.pop(me, None)
            self._closed(str(client_address[0]))  # the thread's shutdown_request closed the socket

    def _closed(self, ip: str) -> None:
        with self._open_lock:
            left = self.by_address[ip] - 1
            if left:
                self.by_address[ip] = left
            else:
                del self.by_address[ip]
        self.conns.release()

    @property
    def open(self) -> int:
        """Connections open now."""
        with self._open_lock:
            return self._open()

    def _open(self) -> int:
        return sum(self.by_address.values())  # at most `connections` addresses: called with the lock held

    def crowded(self) -> bool:
        """Too many connections open to keep this one for its caller's next request."""
        with self._open_lock:
            return self._open() > self.limits.keepalive

    def start(self) -> PeerServer:
        # it waits for connections, not on a clock: close() wakes it (ACCEPT_POLL is only a bound)
        self._thread = threading.Thread(
            target=self.serve_forever, args=(ACCEPT_POLL,), name="peer-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, end every connection being handled, and return once their threads have."""
        self.stop_event.set()
        if self._thread is not None:
            # a listening socket shut down wakes the thread's poll at once on Linux (accept then
            # fails at once, until shutdown() below asks serve_forever to stop), not after its
            # poll interval
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)
            self.shutdown()
            self._thread.join()
        self.server_close()
        with self._open_lock:
            live = dict(self.live)
        for sock in live.values():  # a read or write in progress ends at once; a wait on stop_event
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        bound = time.monotonic() + self.limits.queue_wait + self.limits.timeout
        for thread in live:
            thread.join(max(0.0, bound - time.monotonic()))

    def _refuse(self, h: _Handler, status: int, why: str, extra: dict[str, str] | None = None) -> None:
        """Refuse the request, log it, count it against its address, and close its connection."""
        with self.stats.lock:
            self.stats.refused += 1
        ip = str(h.client_address[0])
        for line in self.refusals.note(ip, f"({status}) {h.path[:160]!r}: {why}", time.monotonic()):
            self.log(line)
        h._reply(status, why + "\n", extra, close=True)

    def serve_chunk(self, h: _Handler) -> None:
        match = _PATH.fullmatch(h.path)
        if match is None:
            self._refuse(h, 404, "not a peer chunk path")
            return
        digest, chunk_hex = match.groups()
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Ticket "):
            self._refuse(h, 401, "expected 'Authorization: Ticket <ticket>' from the controller")
            return
        try:
            with self.swarm.lock:
                keys = dict(self.swarm.keys)
                offset = self.swarm.offset
            holder = ticket.verify(
                auth[len("Ticket ") :].strip(), keys, self.swarm.digest, self.clock() + offset
            ).holder
        except KeyUnknown as exc:
            # not a forgery as far as we know: the caller has a newer key than we do (we announce
            # next within an interval); it says so, and it asks again later instead of dropping us
            self._refuse(h, 403, str(exc), {KEY_HEADER: "unknown"})
            return
        except TicketInvalid as exc:
            self._refuse(h, 403, str(exc))
            return
        h.holder = holder
        chunk = self.swarm.lookup(digest, chunk_hex)
        if chunk is None:
            h._reply(404, "not held here\n")
            return
        last = self.callers.rate(holder)
        slow = last is not None and self.rates.slow(last)
        held = (
            len(self.swarm.manifest)
            if slow
            else held_of(h.headers.get(HELD_HEADER, ""), len(self.swarm.manifest))
        )
        if not self.gate.enter(held, may_wait=not slow):
            with self.stats.lock:
                self.stats.busy += 1
            h._reply(503, "upload slots full\n", {"Retry-After": "1"})
            return
        t0 = time.monotonic()
        try:
            whole = self._send(h, chunk.index, chunk.offset, chunk.length, chunk.digest)
        finally:
            self.gate.leave()
        if whole:  # a chunk that read back wrong or an upload cut short (_send) says nothing of the median
            rate = chunk.length / max(time.monotonic() - t0, 1e-6)
            self.callers.note(holder, rate)
            self.rates.add(rate)

    def _send(self, h: _Handler, index: int, offset: int, length: int, digest: bytes) -> bool:
        """Send the chunk; True once it went out whole."""
        data = bytearray(length)
        got = os.preadv(self.fd, [data], offset)
        if got != length or blake3.blake3(data).digest() != digest:
            self.swarm.forget(index)
            self.log(f"peer server: chunk {index} reads back wrong from the target; no longer offered")
            h._reply(404, "not held here\n")
            return False
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        view = memoryview(data)
        # a slow reader may not hold an upload slot for long: a deadline for the whole upload, and the
        # socket's own timeout cut so that no one write outlasts it
        allowed = self.limits.upload_seconds
        if self.limits.rate > 0:
            allowed += length * self.limits.uploads / self.limits.rate  # its share of the cap
        began = time.monotonic()
        deadline = began + allowed
        for start in range(0, length, SLICE):
            piece = view[start : start + SLICE]
            if not self.bucket.take(len(piece), self.stop_event):
                h.close_connection = True
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                self.log(
                    f"peer server: upload of chunk {index} to {h.client_address[0]} cut off after "
                    f"{allowed:.0f} s ({start} of {length} bytes)"
                )
                # the rate it read at: it is not queued for a slot again (one cut off each time, and
                # so never noted, waited in the queue and held the slot for `allowed` again and again)
                self.callers.note(h.holder, start / allowed)
                h.close_connection = True
                return False
            h.connection.settimeout(min(self.limits.timeout, left))
            try:
                h.wfile.write(piece)
            except TimeoutError:
                self.callers.note(h.holder, start / (time.monotonic() - began))  # as above
                raise
        h.connection.settimeout(self.limits.timeout)  # for the caller's next request on it
        with self.stats.lock:
            self.stats.served_bytes += length
            self.stats.served_chunks += 1
        return True
