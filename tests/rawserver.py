"""A scripted HTTP server on raw sockets (127.0.0.1), for what aiohttp will not send:
floods of informational answers, trickled status lines and headers, endless trailers,
HTTP/1.0 close-delimited bodies. Each connection runs `handler(server, conn)` in a
thread; the server lives at most `lifetime` seconds and stops when the test ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

Handler = Callable[["RawServer", socket.socket], None]


class RawServer:
    def __init__(self, handler: Handler, root: Path | None = None, lifetime: float = 30.0) -> None:
        self.handler = handler
        self.root = root
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.deadline = time.monotonic() + lifetime
        self.connections = 0
        self.requests: list[str] = []  # request lines, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        while self.alive():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        self.sock.close()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self.handler(self, conn)

    def read_request(self, conn: socket.socket, timeout: float = 10.0) -> str | None:
        """The next request's line (its headers read and dropped), or None at EOF."""
        conn.settimeout(timeout)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(4096)
            if not data:
                return None
            buf += data
        line = buf.split(b"\r\n", 1)[0].decode()
        self.requests.append(line)
        return line

    def file_for(self, line: str) -> bytes:
        """The store file a request line names (GET /chunks/aa/HEX HTTP/1.1), query ignored."""
        assert self.root is not None
        path = line.split()[1].split("?", 1)[0].lstrip("/")
        return (self.root / path).read_bytes()

    def trickle(self, conn: socket.socket, data: bytes, step: int = 1, pause: float = 0.2) -> None:
        """Send `data` a few bytes at a time: slow, but never silent long enough to stall."""
        for i in range(0, len(data), step):
            if not self.alive():
                return
            conn.sendall(data[i : i + step])
            time.sleep(pause)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def raw_server(handler: Handler, root: Path | None = None) -> Iterator[RawServer]:
    server = RawServer(handler, root)
    try:
        yield server
    finally:
        server.close()
