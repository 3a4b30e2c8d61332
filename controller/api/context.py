"""What every handler shares: the config, the fleet, the wake-ups; typed app keys."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web

from agent.protocol import MAX_BODY, STORE_PATH
from controller.auth import OperatorKey
from controller.config import store_dir
from controller.metrics import Metrics
from controller.state.operations import Operations
from controller.state.service import Fleet

Auth = Literal["none", "agent", "operator"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Config:
    """The controller's one config object; `sledge serve` builds it from flags."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8470
    public_url: str = ""  # the URL agents are told; default http(s)://host:port
    mirrors: tuple[str, ...] = ()  # more chunk store base URLs handed to agents (nginx, caches)
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_poll_seconds: float = 30.0
    enrollment_ttl: float = 600.0
    reap_interval: float = 2.0
    max_body: int = MAX_BODY
    kernel: str = "vmlinuz"  # under DATA/boot/
    initrd: str = "initrd.img"
    kernel_args: str = "console=ttyS0,115200 console=tty0"
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return store_dir(self.data_dir)

    @property
    def boot_dir(self) -> Path:
        return self.data_dir / "boot"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def sources(self) -> tuple[str, ...]:
        return (f"{self.url}{STORE_PATH}", *self.mirrors)


class Hub:
    """Wake-ups for long-polls (per machine) and event streams (any change)."""

    def __init__(self) -> None:
        self._machines: dict[str, asyncio.Event] = {}
        self._any = asyncio.Event()

    def notify(self, machine_id: str) -> None:
        event = self._machines.pop(machine_id, None)
        if event is not None:
            event.set()
        self._any.set()
        self._any = asyncio.Event()

    def wake_all(self) -> None:
        for machine_id in list(self._machines):
            self.notify(machine_id)
        self.notify("")

    async def wait_machine(self, machine_id: str, timeout: float) -> None:
        event = self._machines.setdefault(machine_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def wait_any(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._any.wait(), timeout)


@dataclass
class Services:
    config: Config
    fleet: Fleet
    ops: Operations
    hub: Hub
    metrics: Metrics
    operator: OperatorKey
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


SERVICES = web.AppKey("services", Services)
MACHINE_ID = web.RequestKey("machine_id", str)  # the machine an agent token speaks for
ETAG = web.RequestKey("etag", str)  # a content digest ETag to send instead of FileResponse's own
SERVED = web.RequestKey("served", bool)  # count the response's bytes as served


@dataclass(frozen=True)
class Route:
    """One row of a route table; the OpenAPI document is written from the same rows."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth = "operator"
    request: str | None = None  # schema name in openapi.SCHEMAS
    response: str | None = None
    params: tuple[str, ...] = ()  # query parameters


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def machine_of(request: web.Request) -> str:
    """The machine an authenticated agent request speaks for (set by the auth wrapper)."""
    return request[MACHINE_ID]
