"""A chunk store over HTTP(S): the controller, nginx mirrors, a CDN they redirect to.

One deadline covers a whole exchange, from the request through the status line, the
headers, any redirects and the last byte of the body (trailers included): a server
that trickles, floods `100 Continue` or never ends a body is cut by a watchdog that
shuts the socket down, whatever http.client is reading at the time. Each thread
keeps one keep-alive connection per origin; a request that fails on a reused
connection before any response arrives (the server closed it while idle) is sent
again once on a fresh one, as browsers and urllib3 do, and is not held against the
source.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

from agent.endpoint import Endpoint
from agent.image import layout
from agent.image.manifest import Chunk
from agent.writer.errors import FetchError

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
MAX_ORIGINS = 4  # connections one thread keeps (the source, plus where it redirects)
MAX_KNOWN_ORIGINS = 16  # redirect targets whose endpoint (and TLS context) is kept
# A failure on a reused connection before any response: the server closed it while idle.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    stall: float = 10.0  # no byte for this long: the source is stalled
    min_rate: float = 1 << 20  # bytes/s: slower than this over a whole chunk is a trickle, not progress

    def __post_init__(self) -> None:
        for name in ("connect", "stall", "min_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"timeouts: {name} must be > 0, got {getattr(self, name)}")

    def deadline(self, size: int) -> float:
        """Seconds one exchange with a body of `size` bytes may take, headers and redirects included."""
        return self.stall + size / self.min_rate


class _Response(http.client.HTTPResponse):
    """http.client skips `100 Continue` only; this skips every informational answer (102, 103
    Early Hints from a CDN...) but 101, whose headers end before the real status line."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if status == 100 or status == 101 or not 100 <= status < 200:
                return version, status, reason
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]


@dataclass(eq=False)  # identity: kept in a set
class _Conn:
    http: http.client.HTTPConnection
    # Kept here: http.client drops its reference on a `Connection: close` response (and closes
    # the socket when that body ends, so its fileno() may read -1 by the time we look again).
    sock: socket.socket
    used: bool = False


class HttpSource:
    """GET {base}/chunks/aa/HEX (and manifests), with the base URL's query string on every request."""

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts | None = None,
        headers: dict[str, str] | None = None,
        ca_file: str = "",
    ) -> None:
        self._endpoint = Endpoint.parse(base_url, "chunk source", ca_file)
        self.name = self._endpoint.url
        self._ca_file = ca_file
        self._timeouts = timeouts or Timeouts()
        self._headers = {"User-Agent": "sledge-agent", **(headers or {})}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[_Conn] = set()
        self._origins: dict[str, Endpoint] = {self._endpoint.origin: self._endpoint}
        self._interrupted = False
        self._watchdog = _Watchdog()

    # -- the two calls a source answers ---------------------------------------------------

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        return self.fetch_within(chunk, buf, None)

    def fetch_within(self, chunk: Chunk, buf: memoryview, budget: float | None) -> int:
        """fetch_into, cut (as too slow) after `budget` seconds if that is sooner than the
        timeouts allow: source health's bound on a try of a source under suspicion."""
        relative = layout.chunk_path(chunk.hex)
        expected = chunk.stored_len
        limit = self._timeouts.deadline(expected)
        if budget is not None:
            limit = min(limit, budget)
        ex = _Exchange(self, relative, limit)
        got = 0
        try:
            resp = ex.open()
            if resp.length is not None and resp.length != expected:
                ex.fail(f"Content-Length {resp.length}, expected {expected}", bad_bytes=True)
            target = buf[:expected]
            # a Content-Length body: blocking reads under the kernel's SO_RCVTIMEO, no poll per recv
            fast = ex.conn.sock if resp.length is not None and ex.conn is not None else None
            if fast is not None:
                fast.settimeout(None)
            try:
                while got < expected:
                    n: int | None = resp.readinto(target[got:])
                    if n is None:  # SO_RCVTIMEO expired: the socket reads as "would block"
                        ex.fail(f"timed out (stalled) after {got} bytes", slow=True)
                    if not n:
                        break
                    got += n
            finally:
                # Not after a failure closed it, nor after a `Connection: close` body: http.client
                # closes that socket itself once the last byte is read (HTTP/1.0 servers, say).
                if fast is not None and ex.conn is not None and fast.fileno() != -1:
                    fast.settimeout(self._timeouts.stall)
            if got < expected:
                ex.fail(f"body ended after {got} of {expected} bytes", progress=got)
            if resp.length is None and resp.read(1):  # chunked or close-delimited: check it ends
                ex.fail(f"body longer than {expected} bytes", bad_bytes=True)
            ex.done(reusable=not resp.will_close)
            return got
        except (OSError, http.client.HTTPException) as exc:
            ex.fail(_describe(exc), progress=got, slow=_timed_out(exc))

    def get(self, relative: str, limit: int) -> bytes:
        ex = _Exchange(self, relative, self._timeouts.deadline(limit))
        try:
            resp = ex.open()
            declared = resp.length
            if declared is not None and declared > limit:
                ex.fail(f"{declared} bytes, expected at most {limit}")
            if declared is not None:  # the budget for what the server says it sends, not the limit
                ex.tighten(self._timeouts.deadline(declared))
            data = resp.read(limit + 1)
            if declared is not None and len(data) != declared:
                ex.fail(f"body ended after {len(data)} of {declared} bytes")
            if len(data) > limit:
                ex.fail(f"more than {limit} bytes")
            ex.done(reusable=not resp.will_close)
            return data
        except (OSError, http.client.HTTPException) as exc:
            ex.fail(_describe(exc), slow=_timed_out(exc))

    def interrupt(self) -> None:
        """Abort every exchange in flight and refuse new ones (a cancelled job)."""
        with self._lock:
            self._interrupted = True
            conns = list(self._all)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            conns, self._all = list(self._all), set()
        for conn in conns:
            conn.http.close()

    # -- connections ----------------------------------------------------------------------

    def _pool(self) -> dict[str, _Conn]:
        pool: dict[str, _Conn] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _conn(self, endpoint: Endpoint) -> _Conn:
        if self._interrupted:
            raise FetchError(self.name, "interrupted")
        pool = self._pool()
        conn = pool.get(endpoint.origin)
        if conn is not None and conn.http.sock is not None:
            return conn
        if conn is not None:  # closed under us (close()): never let http.client reopen it untimed
            del pool[endpoint.origin]
        if len(pool) >= MAX_ORIGINS:
            self._drop(next(iter(pool.values())))
        h = endpoint.connection(self._timeouts.connect)
        h.response_class = _Response
        h.connect()
        assert h.sock is not None
        _stall_timeout(h.sock, self._timeouts.stall)
        with contextlib.suppress(OSError):
            h.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(h, h.sock)
        with self._lock:
            if self._interrupted:  # interrupt() came while this one was connecting
                h.close()
                raise FetchError(self.name, "interrupted")
            self._all.add(conn)
        pool[endpoint.origin] = conn
        return conn

    def _drop(self, conn: _Conn) -> None:
        conn.http.close()
        with contextlib.suppress(OSError):
            conn.sock.close()
        pool = self._pool()
        for origin, c in list(pool.items()):
            if c is conn:
                del pool[origin]
        with self._lock:
            self._all.discard(conn)

    def _endpoint_for(self, url: str) -> Endpoint:
        """The endpoint of a redirect target's origin (one per origin: TLS contexts are not free)."""
        parsed = urllib.parse.urlsplit(url)
        origin = f"{parsed.scheme}://{parsed.netloc}"
        with self._lock:
            endpoint = self._origins.get(origin)
        if endpoint is None:
            endpoint = Endpoint.parse(origin, "redirect target", self._ca_file)
            with self._lock:
                if len(self._origins) >= MAX_KNOWN_ORIGINS:  # a server redirecting everywhere
                    del self._origins[next(o for o in self._origins if o != self._endpoint.origin)]
                self._origins.setdefault(origin, endpoint)
        return endpoint


class _Exchange:
    """One GET under one deadline: the request, redirects, and the body the caller reads."""

    def __init__(self, source: HttpSource, relative: str, budget: float) -> None:
        self.source = source
        self.relative = relative
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.conn: _Conn | None = None
        self.timer: int | None = None

    def open(self) -> http.client.HTTPResponse:
        """Send the GET, follow redirects, return the 200 response with the watchdog armed."""
        src = self.source
        endpoint = src._endpoint
        target = _join(endpoint.prefix + "/" + self.relative, endpoint.query)
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._send(endpoint, target)
            if resp.status == 200:
                return resp
            status, reason = resp.status, resp.reason
            location = resp.getheader("Location")
            retry_after = _retry_after(resp.getheader("Retry-After")) if status in (429, 503) else None
            self._release(reusable=False)  # its body is not read: the connection cannot carry another
            if status in REDIRECTS and location:
                endpoint, target = self._redirect(status, endpoint, target, location)
                continue
            raise FetchError(
                src.name,
                f"GET {self.relative}: HTTP {status} {reason}",
                missing=status in (404, 410),
                retry_after=retry_after,
            )
        self.fail(f"more than {MAX_REDIRECTS} redirects")

    def _redirect(self, status: int, endpoint: Endpoint, target: str, location: str) -> tuple[Endpoint, str]:
        """Where a redirect points: its endpoint and request target (percent-encoded, no fragment)."""
        try:
            url = urllib.parse.urljoin(endpoint.origin + target, location.strip())
            parsed = urllib.parse.urlsplit(url)
            ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
            if ok:
                parsed.port  # noqa: B018 (raises ValueError on a bad port)
        except ValueError:
            ok = False
        if not ok:
            self.fail(f"HTTP {status} redirect to {location!r}: expected an http(s) URL")
        if endpoint.tls is not None and parsed.scheme != "https":
            self.fail(f"HTTP {status} redirect from https to {url}: refusing to drop TLS")
        try:
            new = self.source._endpoint_for(url)
        except ValueError as exc:
            self.fail(f"HTTP {status} redirect: {exc}")
        path = urllib.parse.quote(parsed.path or "/", safe="/%:@!$&'()*+,;=-._~")
        query = urllib.parse.quote(parsed.query, safe="/%:@!$&'()*+,;=-._~?")
        return new, urllib.parse.urlunsplit(("", "", path, query, ""))

    def _send(self, endpoint: Endpoint, target: str) -> http.client.HTTPResponse:
        src = self.source
        for attempt in (1, 2):
            try:
                self.conn = src._conn(endpoint)
            except (OSError, http.client.HTTPException) as exc:
                self.fail(_describe(exc), slow=_timed_out(exc))
            assert self.conn is not None
            reused = self.conn.used
            self.timer = src._watchdog.arm(self.conn.sock, self.deadline - time.monotonic())
            try:
                self.conn.http.request("GET", target, headers=src._headers)
                resp = self.conn.http.getresponse()
                self.conn.used = True
                return resp
            except (OSError, http.client.HTTPException) as exc:
                fired = self._release(reusable=False)
                if not fired and reused and attempt == 1 and isinstance(exc, STALE):
                    continue  # the server closed the idle keep-alive: not the source's fault
                self.fail(_describe(exc), fired=fired, slow=_timed_out(exc))
        raise AssertionError("unreachable")

    def _release(self, reusable: bool) -> bool:
        """Disarm the watchdog; keep the connection only if reusable and not cut. True if it fired."""
        fired = self.source._watchdog.disarm(self.timer) if self.timer is not None else False
        self.timer = None
        if self.conn is not None and (fired or not reusable):
            self.source._drop(self.conn)
        self.conn = None
        return fired

    def tighten(self, budget: float) -> None:
        """Shorten the deadline to `budget` seconds from the start, if that is sooner."""
        deadline = self.deadline - self.budget + budget
        if deadline < self.deadline and self.timer is not None and self.conn is not None:
            if self.source._watchdog.disarm(self.timer):
                self.fail("", fired=True)
            self.deadline, self.budget = deadline, budget
            self.timer = self.source._watchdog.arm(self.conn.sock, deadline - time.monotonic())

    def done(self, reusable: bool) -> None:
        fired = self._release(reusable)
        if fired:
            self.fail("", fired=True)

    def fail(
        self,
        reason: str,
        bad_bytes: bool = False,
        progress: int | None = None,
        fired: bool = False,
        slow: bool = False,
    ) -> NoReturn:
        """Release the connection and raise FetchError; a cut exchange is named as too slow."""
        fired = self._release(reusable=False) or fired
        src = self.source
        if src._interrupted:
            raise FetchError(src.name, f"GET {self.relative}: interrupted")
        if fired or (not bad_bytes and time.monotonic() > self.deadline):
            got = f", {progress} bytes of the body" if progress else ""
            raise FetchError(
                src.name,
                f"GET {self.relative}: too slow: not complete in {self.budget:.1f} s{got} "
                f"(the budget: {src._timeouts.stall:g} s plus the body at {src._timeouts.min_rate:.0f} B/s)",
                slow=True,
            )
        raise FetchError(src.name, f"GET {self.relative}: {reason}", bad_bytes=bad_bytes, slow=slow)


def _join(path: str, query: str) -> str:
    if not query:
        return path
    return f"{path}{'&' if '?' in path else '?'}{query}"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Watchdog:
    """Shuts down sockets whose deadline has passed: one thread per source, only while armed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, seconds: float) -> int:
        with self._lock:
            self._next += 1
            self._armed[self._next] = (time.monotonic() + max(0.0, seconds), sock)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            return self._next

    def disarm(self, token: int) -> bool:
        """Stop watching; True if the deadline had passed and the socket was shut down."""
        with self._lock:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                if not self._armed:
                    self._thread = None
                    return
                overdue = [(t, s) for t, (when, s) in self._armed.items() if when < now]
                for token, sock in overdue:
                    del self._armed[token]
                    self._fired.add(token)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


def _stall_timeout(sock: socket.socket, seconds: float) -> None:
    """Both ways of giving up after `seconds` without a byte, for the two kinds of reading.

    Python's settimeout() (the mode the socket is left in) for what http.client parses itself:
    status line, headers, chunk sizes, trailers, manifests. A stall there raises a timeout
    instead of reading as a short line or an early end. The kernel's SO_RCVTIMEO/SO_SNDTIMEO,
    set here too, take over while fetch_into reads a Content-Length body with the socket in
    blocking mode: settimeout polls before every recv, a system call per read that a 4 MiB
    chunk pays dozens of times. (A zero timeval would mean "never".)
    """
    usec = max(1000, round(seconds * 1_000_000))
    tv = struct.pack("ll", usec // 1_000_000, usec % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(usec / 1_000_000)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | socket.timeout | ssl.SSLWantReadError | ssl.SSLWantWriteError)


def _describe(exc: BaseException) -> str:
    if _timed_out(exc):
        return "timed out (stalled)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text
