"""The peer source: a ChunkSource (agent.writer.sources) that fetches from the agent's peers.

For a chunk of the agent's origin share it answers "missing" (the writer goes on to the mirrors
and the origin) once the swarm holds all but a few of the chunks below it (Swarm.paced); for any
other it asks a random peer that holds it, waiting for one to appear while the swarm makes
progress (unless it is alone in the swarm), then answers "missing" too. Peers send the image bytes
(`serves_raw`), which are hashed here before they are returned, so a peer that serves wrong bytes
is dropped by name while the source stays; the writer hashes them again like any source's. A peer
that refuses the ticket, fails, or sends slower than `min_rate` (also a deadline for the whole chunk:
timeout + length / min_rate) is dropped as well, and so is one that claims chunks it then does not
serve (`strikes` 404s, or only 503s for `patience` seconds).

Connections to a peer are kept open between requests (HTTP/1.1 keep-alive, at most `parallel`
idle ones a peer, for `keepalive` seconds; closed when the peer is dropped and when the source
closes): a fresh connection per chunk paid a handshake and TCP's slow start on every chunk, each
round trip queued behind the capped links' data (measured in the real fleet case: a 1 MiB chunk
from a peer took 5.1 s at p50 where the link's share allows 2-4 s).
"""

from __future__ import annotations

import http.client
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass

import blake3

from agent.image.manifest import Chunk
from agent.peer.bucket import TokenBucket
from agent.peer.deadline import DeadlineSocket
from agent.peer.rates import SLOWER, Rates
from agent.peer.server import HELD_HEADER, KEY_HEADER, PEER_PATH
from agent.peer.swarm import Swarm
from agent.writer.errors import Deferred, FetchError
from agent.writer.sources import ChunkSource

SLICE = 64 << 10
RATE_GRACE = 5.0  # seconds of a transfer before its rate is judged (a slow start is no crawl)
SLOW_IN_A_ROW = 2  # chunks done far below the recent median, one after the other, that drop a peer
SMALL_BODY = 64 << 10  # a refusal's body up to this is read, so that its connection can be kept
DRAIN_SECONDS = 0.5  # ... if it comes within this
# A failure of a kept connection before any answer: the peer closed it while it was idle here.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class PeerOptions:
    patience: float = 30.0  # seconds without a new chunk (here or in the swarm) before the origin
    max_wait: float = 600.0  # the longest one chunk waits for peers
    timeout: float = 5.0  # per socket operation
    # bytes/s below which a peer counts as slow and is dropped; it also bounds one chunk's fetch at
    # timeout + length / min_rate (a peer trickling a byte a second would hold a writer thread forever)
    min_rate: float = 64 << 10
    strikes: int = 3  # 404s for chunks a peer claimed (or 503s over `patience`) before it is dropped
    download: float = 0.0  # this agent's download cap in bytes/s over all sources; 0: none
    # chunks fetched from peers at once: one, at the whole link, is served on soonest (a chunk at a
    # sixth of the rate is held back from the swarm six times as long; section G at N = 50 and 100:
    # one at a time p50 1.26-1.28 and 1.38 S/B, two 1.32-1.33 and 1.43-1.46)
    parallel: int = 1
    busy_backoff: float = 0.5  # seconds a peer that answered 503 is not asked, doubling in a row
    max_backoff: float = 1.0  # ... up to this (a longer one left free slots unasked in a young swarm)
    # seconds an idle connection to a peer is kept for the next request: under the peer server's
    # own idle timeout (ServeLimits.timeout, 10 s), so that it is rarely closed under us
    keepalive: float = 3.0
    # the local address connections to peers come from ("": the system's choice); an agent with
    # one provisioning interface needs none, the simulated fleet gives each agent its own
    source_address: str = ""


class _Connection(http.client.HTTPConnection):
    """A connection to a peer whose answers' heads (and refusals' bodies) must come by a deadline."""

    # its socket, also once an answer that closes the connection took it over (getresponse)
    reads: DeadlineSocket | None = None

    def connect(self) -> None:
        super().connect()
        self.sock = self.reads = DeadlineSocket.of(self.sock)

    def answer_within(self, seconds: float, what: str) -> None:
        if self.reads is not None:
            self.reads.within(seconds, what)


class _Failed(Exception):
    def __init__(self, reason: str, drop: bool, status: int = 0) -> None:
        super().__init__(reason)
        self.drop = drop
        self.status = status


@dataclass
class _Idle:
    conn: _Connection
    since: float  # monotonic


class PeerSource:
    name = "peers"
    serves_raw = True
    pool = True  # keeps each peer's health itself: the writer's source health asks it first, always

    def __init__(self, swarm: Swarm, options: PeerOptions, bucket: TokenBucket | None = None) -> None:
        self.swarm = swarm
        self.options = options
        self.bucket = bucket or TokenBucket(options.download)
        self.stop = threading.Event()
        self.bytes_by_peer: dict[str, int] = {}
        self.declined: dict[str, int] = {}  # why chunks went to the sources: share, alone, stalled
        self._lock = threading.Lock()
        # a peer that claims chunks and does not serve them (404, or 503 for ever) stalls the others:
        # its 404s are counted, and how long it has answered only 503
        self._missing: dict[str, int] = {}
        self._busy: dict[str, tuple[int, float]] = {}  # url -> (503s in a row, since when)
        self._slow: dict[str, int] = {}  # url -> chunks in a row done far below the recent median
        # asks a busy peer turned away, over the job: on a real link each cost a round trip through
        # the capped links' queues (the real fleet case: 2-3 a chunk, 7-20% of a deploy; docs/peers.md)
        self.busy_answers = 0
        self.rates = Rates()  # recent chunks' rates from peers: a peer far below them is slow
        self._idle: dict[str, list[_Idle]] = {}  # url -> connections kept for its next request
        self.connections = 0  # opened, over the job (a kept connection saves one)

    def _waiting(self, deadline: float) -> bool:
        """Worth waiting on: the swarm still makes progress, within the longest wait."""
        return (
            not self.stop.is_set()
            and time.monotonic() < deadline
            and not self.swarm.stalled(self.options.patience)
        )

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        deferred = False
        try:
            return self._fetch_into(chunk, buf)
        except Deferred:
            deferred = True
            raise
        finally:
            if not deferred:
                self.swarm.settled(chunk.index)

    def _fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        # wait for the swarm while it makes progress (a chunk new to it or to this agent at least
        # every `patience` seconds), at most `max_wait` for one chunk
        if not self.swarm.joined():
            raise FetchError(self.name, f"chunk {chunk.index}: no announce has worked yet", missing=True)
        deadline = time.monotonic() + self.options.max_wait
        if self.swarm.mine(chunk.index):
            while not self.swarm.paced(chunk.index) and self._waiting(deadline):
                self.swarm.wait_change(0.1)
            raise FetchError(self.name, f"chunk {chunk.index} is this agent's origin share", missing=True)
        tried: set[str] = set()
        while not self.stop.is_set():
            holders = [u for u in self.swarm.holders(chunk.index) if u not in tried]
            if not holders:
                # another member of the swarm fetches it from the origin: wait for it (a lone agent
                # goes on at once)
                why = (
                    "share"
                    if self.swarm.mine(chunk.index)
                    else "alone"
                    if self.swarm.alone()
                    else ""
                    if self._waiting(deadline)
                    else "stalled"
                )
                if why:
                    with self._lock:
                        self.declined[why] = self.declined.get(why, 0) + 1
                    raise FetchError(self.name, f"no peer holds chunk {chunk.index} ({why})", missing=True)
                if self.swarm.defer(chunk.index):
                    # no peer can give it now: the thread takes another chunk that one can give
                    # instead of waiting on this one (head-of-line); the order hands it out again
                    raise Deferred(f"{chunk.describe()}: no peer free to serve it now")
                self.swarm.wait_change(0.1)
                tried.clear()  # a holder that was busy (503) may have a slot now
                continue
            after = self.swarm.after(chunk.index)
            url = after if after in holders else self.swarm.rng.choice(holders)
            tried.add(url)
            try:
                n = self._get(url, chunk, buf)
            except _Failed as exc:
                if self.stop.is_set():
                    break
                if exc.drop:
                    self.swarm.drop(url, str(exc))
                else:
                    self.swarm.learned(url, chunk.index)
                    self._strike(url, exc.status, chunk)
                continue
            with self._lock:
                self._busy.pop(url, None)
            if n != chunk.length or blake3.blake3(buf[:n]).digest() != chunk.digest:
                self.swarm.drop(url, f"served bad bytes for {chunk.describe()}", bad=True)
                continue
            with self._lock:
                self.bytes_by_peer[url] = self.bytes_by_peer.get(url, 0) + n
            self.swarm.served_by(url, chunk.index)
            return n
        raise FetchError(self.name, "interrupted")

    def _strike(self, url: str, status: int, chunk: Chunk) -> None:
        """Count a 404 or 503 against a peer that said it held the chunk; drop it past the limit."""
        now = time.monotonic()
        with self._lock:
            if status == 404:
                n = self._missing[url] = self._missing.get(url, 0) + 1
                why = f"answered 404 for {n} chunks it claimed (last {chunk.describe()})"
                over = n >= self.options.strikes
            elif status == 503:
                self.busy_answers += 1
                count, since = self._busy.get(url, (0, now))
                self._busy[url] = (count + 1, since)
                # its slots are full: it is left alone a while, longer each time it says so in a
                # row (a peer that claims chunks and answers only 503 is soon hardly asked)
                self.swarm.backoff(url, min(self.options.busy_backoff * 2**count, self.options.max_backoff))
                # an honest peer of a young swarm is busy most of the time (a few upload slots,
                # many asking): it is dropped only if it is all the swarm has had for `patience`
                over = (
                    count + 1 >= self.options.strikes
                    and now - since >= self.options.patience
                    and self.swarm.stalled(self.options.patience)
                )
                why = f"answered only 503 for {now - since:.0f} s ({count + 1} times)"
            else:
                return
        if over:
            self.swarm.drop(url, why)

    # -- connections ----------------------------------------------------------------------------------

    def _checkout(self, url: str) -> tuple[_Connection, bool]:
        """A kept connection to the peer (True), else a new one (False, not yet connected)."""
        now = time.monotonic()
        with self._lock:
            old = self._prune(now)
            kept = self._idle.get(url)
            idle = kept.pop() if kept else None  # the most recent: the least likely closed
        for c in old:
            c.close()
        if idle is not None:
            return idle.conn, True
        return self._new(url), False

    def _new(self, url: str) -> _Connection:
        parts = urllib.parse.urlsplit(url)
        with self._lock:
            self.connections += 1
        bind = (self.options.source_address, 0) if self.options.source_address else None
        timeout = self.options.timeout
        return _Connection(parts.hostname or "", parts.port, timeout=timeout, source_address=bind)

    def _checkin(self, url: str, conn: _Connection) -> None:
        """Keep a connection whose answer was read whole for the peer's next request."""
        with self._lock:
            kept = self._idle.setdefault(url, [])
            if (
                not self.stop.is_set()
                and url not in self.swarm.dropped
                and self.options.keepalive > 0
                and len(kept) < max(1, self.options.parallel)
            ):
                kept.append(_Idle(conn, time.monotonic()))
                return
        conn.close()

    def _prune(self, now: float) -> list[_Connection]:
        """Take out the kept connections that idled too long or lead to a dropped peer (lock held)."""
        old = []
        for url in list(self._idle):
            dropped = url in self.swarm.dropped
            keep = [i for i in self._idle[url] if not dropped and now - i.since < self.options.keepalive]
            old += [i.conn for i in self._idle[url] if i not in keep]
            if keep:
                self._idle[url] = keep
            else:
                del self._idle[url]
        return old

    def _close_idle(self) -> None:
        with self._lock:
            old = [i.conn for kept in self._idle.values() for i in kept]
            self._idle.clear()
        for c in old:
            c.close()

    def _ask(self, conn: _Connection, chunk: Chunk) -> http.client.HTTPResponse:
        conn.request(
            "GET",
            f"{PEER_PATH}{self.swarm.digest}/{chunk.hex}",
            headers={"Authorization": f"Ticket {self.swarm.ticket()}", HELD_HEADER: str(self.swarm.held())},
        )
        # the head within the timeout (a peer's upload gate answers within its shorter wait), and a
        # refusal's body too: a peer trickling them a byte, or a '100 Continue', at a time holds
        # this thread no longer; a 200's body has the chunk's own bounds (_get)
        conn.answer_within(self.options.timeout, f"the head of the answer for chunk {chunk.index}")
        return conn.getresponse()

    def _open(self, url: str, chunk: Chunk) -> tuple[_Connection, http.client.HTTPResponse]:
        """Send the request (on a kept connection if there is one) and read the status and headers."""
        conn, kept = self._checkout(url)
        if kept:
            try:
                return conn, self._ask(conn, chunk)
            except STALE:
                # the peer closed it while it idled here: asked again on a new connection, as
                # browsers do, and not held against the peer
                conn.close()
                conn = self._new(url)
            except BaseException:
                conn.close()
                raise
        try:
            return conn, self._ask(conn, chunk)
        except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
            conn.close()
            # closed before any answer: what a peer whose connections are all taken does (see
            # PeerServer.process_request); busy, then, and dropped only if it stays so
            raise _Failed(f"closed before answering: {exc}", drop=False, status=503) from None
        except BaseException:
            conn.close()
            raise

    def _get(self, url: str, chunk: Chunk, buf: memoryview) -> int:
        conn: _Connection | None = None
        keep = False  # the answer was read whole: the connection may carry the next request
        try:
            conn, resp = self._open(url, chunk)
            unknown = resp.status == 403 and resp.getheader(KEY_HEADER, "") == "unknown"
            if resp.status in (404, 503) or unknown:
                # a busy (503) or lacking (404) peer is asked again: its connection is kept
                keep = _drained(conn, resp)
            if unknown:
                # it has not been handed our key yet (a new epoch, a restarted controller): asked
                # again after its next announce; one that says so for `patience` is dropped as busy
                raise _Failed("does not know our ticket's key yet", drop=False, status=503)
            if resp.status in (401, 403):
                raise _Failed(f"refused our ticket: HTTP {resp.status}", drop=True)
            if resp.status in (404, 503):
                raise _Failed(f"HTTP {resp.status}", drop=False, status=resp.status)
            if resp.status != 200:
                raise _Failed(f"HTTP {resp.status}", drop=True)
            conn.answer_within(math.inf, "")
            length = resp.getheader("Content-Length", "")
            if length != str(chunk.length):
                raise _Failed(f"Content-Length {length[:20]!r}, expected {chunk.length}", drop=True)
            coding = resp.getheader("Transfer-Encoding")
            if coding is not None:
                # peer servers send Content-Length bodies; a chunked one's size lines are read whole
                # inside read1, past the rate checks below (one trickled held the fetch for days)
                raise _Failed(f"Transfer-Encoding {coding[:20]!r}, expected none", drop=True)
            t0 = time.monotonic()  # rates from the answer on: a caller that held nothing may have
            # waited for the peer's slot (agent.peer.gate) before it, within the socket's timeout
            got = 0
            waited = 0.0  # in our own download cap: the peer's rate leaves it out
            allowed = self.options.timeout + (
                chunk.length / self.options.min_rate if self.options.min_rate > 0 else 0.0
            )
            # slow: below the fixed floor (our own download cap's waits left out), or far below what
            # chunks from peers ran at here lately (wall clock, both: what our cap and our other
            # fetches leave a peer is the same for all), judged after a grace of one and a half such
            # chunks (at most RATE_GRACE)
            grace, relative = RATE_GRACE, 0.0
            expected = self.rates.expected()
            if expected is not None:
                relative = expected / SLOWER
                grace = min(RATE_GRACE, max(1.0, 1.5 * chunk.length / expected))
            while got < chunk.length:
                if self.stop.is_set():
                    raise _Failed("interrupted", drop=False)
                # read1: what one read of the socket brings (readinto would wait for a whole slice,
                # and a trickle of a byte a second never times out)
                data = resp.read1(min(chunk.length - got, SLICE))
                n = len(data)
                if not n:
                    break
                buf[got : got + n] = data
                got += n
                t1 = time.monotonic()
                if not self.bucket.take(n, self.stop):
                    raise _Failed("interrupted", drop=False)
                waited += time.monotonic() - t1
                spent = t1 - t0 - waited
                wall = t1 - t0
                if got < chunk.length and (
                    (self.options.min_rate > 0 and spent >= grace and got / spent < self.options.min_rate)
                    or (relative > 0 and wall >= grace and got / wall < relative)
                ):
                    # past a short grace a peer this slow is left at once: waiting out the chunk's
                    # deadline held one of two fetch slots for up to 30 s in the fleet bench, and
                    # the agents that met one of the 5% slowed peers became the p99
                    raise _Failed(
                        f"trickled {got} of {chunk.length} bytes in {wall:.1f} s: {got / wall:.0f}"
                        f" bytes/s, expected >= {max(self.options.min_rate, relative):.0f}",
                        drop=True,
                    )
                if self.options.min_rate > 0 and spent > allowed and got < chunk.length:
                    # each read returned within the timeout, but the whole chunk crawls
                    raise _Failed(
                        f"trickled {got} of {chunk.length} bytes in {t1 - t0 - waited:.0f} s, expected "
                        f"the chunk within {allowed:.0f} s (at >= {self.options.min_rate:.0f} bytes/s)",
                        drop=True,
                    )
            if got != chunk.length:
                raise _Failed(f"closed after {got} of {chunk.length} bytes", drop=True)
            # read1 leaves a body read to its end open: closed, the connection carries the next request
            keep = resp.length == 0 and not resp.will_close
            resp.close()
            wall = max(time.monotonic() - t0, 1e-6)
            spent = max(wall - waited, 1e-6)
            floor = self.options.min_rate > 0 and got / spent < self.options.min_rate
            if floor or got / wall < relative:
                # the bytes are kept (they are checked like any). Below the fixed floor the peer is
                # not asked again; far below the recent median only on the second chunk in a row:
                # one chunk done within the grace is a single sample, and one that took a few
                # scheduler hiccups on a busy host (32 against 205 MB/s on loopback) lost a peer
                # that served the next at the usual rate
                with self._lock:
                    n = self._slow[url] = self._slow.get(url, 0) + 1
                if floor or n >= SLOW_IN_A_ROW:
                    least = max(self.options.min_rate, relative)
                    row = "" if floor else f" ({n} chunks in a row)"
                    self.swarm.drop(url, f"slow: {got / wall:.0f} bytes/s, expected >= {least:.0f}{row}")
            else:
                with self._lock:
                    self._slow.pop(url, None)
                self.rates.add(got / wall)
                self.swarm.chunk_seconds = chunk.length / (self.rates.expected() or got / wall)
            return got
        except (OSError, http.client.HTTPException) as exc:
            keep = False
            raise _Failed(f"{type(exc).__name__}: {_brief(exc)}", drop=True) from None
        finally:
            if conn is not None:
                if keep:
                    self._checkin(url, conn)
                else:
                    conn.close()

    def get(self, relative: str, limit: int) -> bytes:
        raise FetchError(self.name, "peers serve chunks only", missing=True)

    def interrupt(self) -> None:
        self.stop.set()
        self.swarm.halt()  # a thread waiting for a chunk to be ready stops waiting
        self._close_idle()

    def close(self) -> None:
        self.stop.set()
        self.swarm.halt()
        self._close_idle()


def _drained(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> bool:
    """Read a refusal's small body whole, briefly: its connection may then carry the next request.
    A body that does not come at once only costs the connection (a refusal stays a refusal, not a
    failure that drops the peer, as when its connection was closed without reading it)."""
    if resp.length is None or resp.length > SMALL_BODY or conn.sock is None:
        return False
    timeout = conn.sock.gettimeout()
    try:
        conn.sock.settimeout(min(DRAIN_SECONDS, timeout or DRAIN_SECONDS))
        resp.read()
        conn.sock.settimeout(timeout)
    except (OSError, http.client.HTTPException):
        return False
    return resp.isclosed() and not resp.will_close


class CappedSource:
    """A source under this agent's download cap (the token bucket the peer source uses too)."""

    def __init__(self, source: ChunkSource, bucket: TokenBucket) -> None:
        self.source = source
        self.bucket = bucket
        self.name = source.name

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        # the chunk's tokens are taken as it starts and waited for only past the transfer's own time:
        # a capped link carries the chunk at min(the server's rate, the cap), not the two in turn
        # (taking them afterwards doubled the time of every chunk from the origin in the fleet bench)
        wait = self.bucket.reserve(chunk.stored_len)
        t0 = time.monotonic()
        n = self.source.fetch_into(chunk, buf)
        left = wait - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        return n

    def get(self, relative: str, limit: int) -> bytes:
        return self.source.get(relative, limit)

    def interrupt(self) -> None:
        self.source.interrupt()

    def close(self) -> None:
        self.source.close()


def _brief(exc: BaseException, most: int = 160) -> str:
    """An exception's text as a drop's reason (a job event) may carry it: a hostile peer's status
    line, up to 64 KiB of anything, is in http.client's BadStatusLine."""
    text = str(exc)
    return text if len(text) <= most and text.isprintable() else repr(text[:most])
