"""A real HTTP chunk server on 127.0.0.1 that can be scripted to misbehave.

It serves a store directory like nginx would, except that a fault can be queued
per chunk digest: flip a bit, truncate, stall, 500, 404, a wrong Content-Length,
close mid-body, an over-long body, or another chunk's bytes. It counts what it
serves, so tests can assert what a writer downloaded.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

FAULTS = (
    "flip",
    "truncate",
    "stall",
    "500",
    "404",
    "short-length",
    "long-length",
    "close",
    "long",
    "other",
    "trickle",
)


class ChunkServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self.always: dict[str, str] = {}  # digest or "*" -> fault, every time
        self.requests: collections.Counter[str] = collections.Counter()
        self.bytes_sent = 0
        self.delay = 0.0  # seconds before each chunk response (to slow a writer down)
        # Chunk requests past this many wait until release(): a writer is held mid-write for as
        # long as a test needs, however fast or slow the machine is.
        self.hold_after: int | None = None
        self.held = 0  # requests waiting now
        self._released = threading.Event()
        self.url = ""
        self._lock = threading.Lock()

    def release(self) -> None:
        self._released.set()

    def fault(self, digest: str, *faults: str) -> None:
        with self._lock:
            self.faults[digest].extend(faults)

    def _next_fault(self, digest: str) -> str | None:
        with self._lock:
            if self.faults[digest]:
                return self.faults[digest].popleft()
            return self.always.get(digest) or self.always.get("*")

    async def chunk(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.root / "chunks" / request.match_info["prefix"] / name
        with self._lock:
            self.requests[name] += 1
            hold = self.hold_after is not None and sum(self.requests.values()) > self.hold_after
            self.held += hold
        try:
            while hold and not self._released.is_set():
                await asyncio.sleep(0.01)
        finally:
            with self._lock:
                self.held -= hold
        if self.delay:
            await asyncio.sleep(self.delay)
        fault = self._next_fault(name)
        if not path.is_file():
            raise web.HTTPNotFound()
        data = path.read_bytes()
        if fault == "404":
            raise web.HTTPNotFound()
        if fault == "500":
            raise web.HTTPInternalServerError(text="scripted failure")
        if fault == "flip":
            b = bytearray(data)
            b[len(b) // 2] ^= 0x10
            data = bytes(b)
        if fault == "other":
            others = [p for p in (self.root / "chunks").rglob("*") if p.is_file() and p.name != name]
            data = others[0].read_bytes()[: len(data)] if others else data[::-1]
            data = data + bytes(len(path.read_bytes()) - len(data))
        resp = web.StreamResponse()
        declared = len(data)
        if fault == "short-length":
            declared -= 10
        elif fault == "long-length":
            declared += 10
        if fault == "long":
            resp.enable_chunked_encoding()
            data = data + b"extra bytes past the chunk"
        else:
            resp.content_length = declared
        await resp.prepare(request)
        if fault in ("truncate", "close", "long-length"):
            await resp.write(data[: len(data) // 2])
            self.bytes_sent += len(data) // 2
            assert request.transport is not None
            request.transport.close()
            return resp
        if fault == "trickle":  # a byte now and then: never stalled, never done
            for i in range(len(data)):
                await resp.write(data[i : i + 1])
                await asyncio.sleep(0.2)
            return resp
        if fault == "stall":
            await resp.write(data[: len(data) // 2])
            await asyncio.sleep(30)
            return resp
        if fault == "short-length":
            data = data[:declared]
        await resp.write(data)
        self.bytes_sent += len(data)
        await resp.write_eof()
        return resp

    async def file(self, request: web.Request) -> web.StreamResponse:
        path = self.root / request.match_info["kind"] / request.match_info["name"]
        if not path.is_file() or ".." in request.match_info["name"]:
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/chunks/{prefix}/{name}", self.chunk)
        app.router.add_get("/{kind:manifests|catalog}/{name:.+}", self.file)
        return app


@contextmanager
def serve(root: Path) -> Iterator[ChunkServer]:
    """Run a ChunkServer for `root` on 127.0.0.1 in a background thread."""
    server = ChunkServer(root)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, web.AppRunner] = {}

    async def start() -> None:
        runner = web.AppRunner(server.app(), handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        state["runner"] = runner
        ready.set()

    thread = threading.Thread(
        target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True
    )
    thread.start()
    ready.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
