"""Chunk sources: a chunk store over HTTP (the controller, nginx mirrors) or in a directory.

A source only moves stored bytes into a caller's buffer; it never decides whether
they are good. Each thread keeps its own keep-alive connection per source.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from agent.endpoint import Endpoint
from agent.image import layout
from agent.image.manifest import Chunk
from agent.writer.errors import FetchError


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    stall: float = 10.0  # no byte for this long: the source is stalled
    min_rate: float = 1 << 20  # bytes/s: slower than this over a whole chunk is a trickle, not progress

    def deadline(self, size: int) -> float:
        """Seconds one body of `size` bytes may take: a trickling server cannot hold a chunk forever."""
        return self.stall + size / self.min_rate


class ChunkSource(Protocol):
    name: str

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        """Read the chunk's stored bytes into buf[:chunk.stored_len]; return the count."""
        ...

    def get(self, relative: str, limit: int) -> bytes:
        """A small file of the store (a manifest), at most `limit` bytes."""
        ...

    def close(self) -> None: ...


class DirectorySource:
    def __init__(self, root: str) -> None:
        self.root = root
        self.name = root

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        path = os.path.join(self.root, layout.chunk_path(chunk.hex))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FetchError(self.name, f"{path}: no such chunk", missing=True) from None
        except OSError as exc:
            raise FetchError(self.name, f"{path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != chunk.stored_len:
                raise FetchError(
                    self.name, f"{path}: expected {chunk.stored_len} bytes, file has {size}", bad_bytes=True
                )
            got = 0
            while got < size:
                n = os.preadv(fd, [buf[got:size]], got)
                if n == 0:
                    raise FetchError(self.name, f"{path}: short read at {got} of {size}", bad_bytes=True)
                got += n
            return got
        finally:
            os.close(fd)

    def get(self, relative: str, limit: int) -> bytes:
        path = os.path.join(self.root, relative)
        try:
            with open(path, "rb") as f:
                return f.read(limit + 1)
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError)
            raise FetchError(self.name, f"{path}: {exc.strerror}", missing=missing) from None

    def close(self) -> None:
        pass


class HttpSource:
    """A chunk store served over HTTP(S): GET {base}/chunks/aa/HEX, one connection per thread."""

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts | None = None,
        headers: dict[str, str] | None = None,
        ca_file: str = "",
    ) -> None:
        self._endpoint = Endpoint.parse(base_url, "chunk source", ca_file)
        self.name = self._endpoint.url
        self._timeouts = timeouts or Timeouts()
        self._headers = {"User-Agent": "sledge-agent", **(headers or {})}
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._watchdog = _Watchdog()

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._endpoint.connection(self._timeouts.connect)
            conn.connect()
            if conn.sock is not None:
                _stall_timeout(conn.sock, self._timeouts.stall)
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def _request(self, relative: str) -> http.client.HTTPResponse:
        url = f"{self._endpoint.prefix}/{relative}"
        try:
            conn = self._conn()
            conn.request("GET", url, headers=self._headers)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise FetchError(self.name, f"GET {url}: {_describe(exc)}") from None

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        relative = layout.chunk_path(chunk.hex)
        resp = self._request(relative)
        try:
            if resp.status != 200:
                resp.read(4096)
                self._drop()
                raise FetchError(
                    self.name, f"GET {relative}: HTTP {resp.status} {resp.reason}", missing=resp.status == 404
                )
            expected = chunk.stored_len
            if resp.length is not None and resp.length != expected:
                self._drop()
                raise FetchError(
                    self.name,
                    f"GET {relative}: Content-Length {resp.length}, expected {expected}",
                    bad_bytes=True,
                )
            got = 0
            target = buf[:expected]
            # a watchdog cuts a body that trickles in slower than min_rate: recv timeouts
            # alone never fire while a byte arrives now and then
            limit = self._timeouts.deadline(expected)
            timer = self._watchdog.arm(self._conn().sock, limit)
            try:
                while got < expected:
                    n: int | None = resp.readinto(target[got:])
                    if n is None:  # SO_RCVTIMEO expired: the socket reads as "would block"
                        raise FetchError(self.name, f"GET {relative}: timed out (stalled) after {got} bytes")
                    if n == 0:
                        break
                    got += n
            except (OSError, http.client.HTTPException, FetchError):
                if not self._watchdog.disarm(timer):
                    self._drop()
                    raise
                fired = True
            else:
                fired = self._watchdog.disarm(timer)
            if fired:
                self._drop()
                raise FetchError(
                    self.name,
                    f"GET {relative}: too slow: {got} of {expected} bytes in {limit:.1f} s "
                    f"(under {self._timeouts.min_rate:.0f} B/s)",
                )
            if got < expected:
                self._drop()
                raise FetchError(self.name, f"GET {relative}: body ended after {got} of {expected} bytes")
            if resp.length is None and resp.read(1):  # chunked or close-delimited: check it ends
                self._drop()
                message = f"GET {relative}: body longer than {expected} bytes"
                raise FetchError(self.name, message, bad_bytes=True)
            if resp.will_close:
                self._drop()
            return got
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise FetchError(self.name, f"GET {relative}: {_describe(exc)}") from None

    def get(self, relative: str, limit: int) -> bytes:
        resp = self._request(relative)
        try:
            if resp.status != 200:
                self._drop()
                raise FetchError(
                    self.name, f"GET {relative}: HTTP {resp.status} {resp.reason}", missing=resp.status == 404
                )
            if resp.length is not None and resp.length > limit:
                self._drop()
                raise FetchError(self.name, f"GET {relative}: {resp.length} bytes, expected at most {limit}")
            declared = resp.length
            seconds = self._timeouts.deadline(declared if declared is not None else limit)
            timer = self._watchdog.arm(self._conn().sock, seconds)
            try:
                data = resp.read(limit + 1)
            finally:
                if self._watchdog.disarm(timer):
                    self._drop()
                    raise FetchError(self.name, f"GET {relative}: too slow: not complete in {seconds:.1f} s")
            if declared is not None and len(data) != declared:
                self._drop()
                raise FetchError(self.name, f"GET {relative}: body ended after {len(data)} bytes")
            if resp.will_close or len(data) > limit:
                self._drop()
            return data
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise FetchError(self.name, f"GET {relative}: {_describe(exc)}") from None

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class _Watchdog:
    """Shuts down sockets whose deadline has passed: one thread per source, only while armed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, socket.socket | None]] = {}
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket | None, seconds: float) -> int:
        with self._lock:
            self._next += 1
            self._armed[self._next] = (time.monotonic() + seconds, sock)
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
            time.sleep(0.2)
            now = time.monotonic()
            with self._lock:
                if not self._armed:
                    self._thread = None
                    return
                overdue = [(t, s) for t, (when, s) in self._armed.items() if when < now]
                for token, sock in overdue:
                    del self._armed[token]
                    self._fired.add(token)
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)


def _stall_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads and writes give up after `seconds` without progress.

    The kernel's SO_RCVTIMEO/SO_SNDTIMEO rather than Python's settimeout(): the latter
    makes the socket non-blocking and polls before every recv, a system call per
    read that a 4 MiB chunk pays dozens of times.
    """
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out (stalled)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text


def open_source(spec: str, timeouts: Timeouts | None = None) -> ChunkSource:
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, timeouts)
    if os.path.isdir(spec):
        return DirectorySource(spec)
    raise ValueError(f"chunk source {spec!r}: expected an http(s) URL or a store directory")
