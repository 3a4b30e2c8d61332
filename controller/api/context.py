"""What every handler shares: the config, the fleet, the wake-ups; typed app keys."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from controller.api.forwarded import HEADER, Network, client_address
from controller.auth import OperatorKey
from controller.config import Config
from controller.fleet.agents import Fleet
from controller.fleet.enrollment import Enrollment
from controller.fleet.operators import Operations
from controller.fleet.tracker import Tracker
from controller.metrics import Metrics
from controller.power.service import Power

Auth = Literal["none", "agent", "operator"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    enrollment: Enrollment
    ops: Operations
    hub: Hub
    metrics: Metrics
    operator: OperatorKey
    power: Power
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    presign: Callable[[str], str] | None = None  # store path -> presigned bucket URL (--s3-store)
    tracker: Tracker = field(default_factory=Tracker)  # in memory: which agent holds which chunks
    proxies: tuple[Network, ...] = ()  # config.trusted_proxies, parsed


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
    request: str | None = None  # a message name in openapi.MESSAGES
    response: str | None = None
    params: tuple[str, ...] = ()  # query parameters


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def peer(request: web.Request) -> str:
    """The address the request came from: through a trusted proxy, the client's it names
    (controller.api.forwarded); behind any other forwarder (QEMU user networking), the forwarder's."""
    svc = services(request)
    return client_address(request.remote or "", request.headers.getall(HEADER, ()), svc.proxies)


def machine_of(request: web.Request) -> str:
    """The machine an authenticated agent request speaks for (set by the auth wrapper)."""
    return request[MACHINE_ID]
