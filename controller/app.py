"""make_app(config, store): the controller's aiohttp application.

Routes come as tables, one per area (controller/api/*); each row says who may call
it, and app.py wraps the handler accordingly. A background task re-queues or fails
jobs whose lease ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from agent.protocol import STORE_PATH
from controller import auth
from controller.api import agent, boot, files, openapi, operator, power, views
from controller.api.context import MACHINE_ID, SERVICES, Handler, Hub, Route, Services, services
from controller.api.forwarded import parse_proxies
from controller.api.wire import errors_middleware, respond
from controller.config import Config
from controller.fleet.agents import Fleet, Policy
from controller.fleet.enrollment import Enrollment
from controller.fleet.operators import Operations
from controller.fleet.tracker import Tracker, TrackerPolicy
from controller.jobs import JobState
from controller.metrics import Metrics, render_swarms
from controller.power.service import Connector, Power, PowerPolicy, connect
from controller.state.store import Store
from controller.trust.leases import Leases
from controller.trust.limits import FailureLimiter, Limit

__all__ = ["Config", "make_app", "routes"]
log = logging.getLogger("sledge.app")


async def healthz(request: web.Request) -> web.StreamResponse:
    services(request).ops.counts()  # the database answers
    return respond(request, views.Health(True).to_wire())


async def metrics(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    bmc = (
        "# HELP sledge_bmc_requests_total Calls to BMCs (power status polls, actions, job power-ups).\n"
        "# TYPE sledge_bmc_requests_total counter\n"
        f"sledge_bmc_requests_total {svc.power.requests}\n"
    )
    text = svc.metrics.render(svc.ops.counts()) + bmc + render_swarms(svc.tracker.counts())
    return web.Response(text=text, content_type="text/plain")


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(openapi.document(routes()))


MISC = (
    Route(
        "GET",
        "/healthz",
        healthz,
        "Liveness: the process and its database answer",
        auth="none",
        response="Health",
    ),
    Route("GET", "/metrics", metrics, "Prometheus metrics", auth="none", response="Metrics"),
    Route("GET", "/v1/openapi.json", openapi_json, "This document", auth="none", response="OpenAPI"),
)


def routes() -> tuple[Route, ...]:
    return agent.ROUTES + operator.ROUTES + power.ROUTES + boot.ROUTES + files.ROUTES + MISC


def _guard(route: Route) -> Handler:
    handler = route.handler
    if route.auth == "none":
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        svc = services(request)
        token = auth.bearer(request.headers.get("Authorization"))
        if route.auth == "operator":
            svc.operator.check(token)
        else:
            request[MACHINE_ID] = svc.fleet.authenticate_agent(token)
        return await handler(request)

    return guarded


async def _reaper(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    resumed = svc.fleet.grant_grace()
    if resumed:
        log.info("%d running job(s) given a fresh lease after the restart", resumed)

    async def loop() -> None:
        while True:
            await asyncio.sleep(svc.config.reap_interval)
            try:
                for job in svc.fleet.reap():
                    log.warning("job %s: %s", job.id, job.status.reason)
                    if job.status.state is JobState.QUEUED:  # re-queued: boot the machine to a new agent
                        svc.power.job_requeued(job.id)
            except Exception:
                log.exception("lease reaper")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _power_poller(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    task = asyncio.create_task(svc.power.poll_loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await svc.power.close()


async def _on_shutdown(app: web.Application) -> None:
    svc = app[SERVICES]
    svc.stopping.set()
    svc.hub.wake_all()


def _presigner(config: Config) -> Callable[[str], str] | None:
    if not config.s3_store:
        return None
    from controller.images import s3  # boto3 only for a controller that uses a bucket

    loc = s3.S3Location.parse(config.s3_store)
    return s3.presigner(s3.client(config.s3_endpoint_url), loc, config.presign_seconds)


def make_app(
    config: Config,
    store: Store,
    *,
    operator_key: auth.OperatorKey | None = None,
    clock: Callable[[], float] = time.time,
    leases: Leases | None = None,
    bmc_connector: Connector = connect,
) -> web.Application:
    """`leases`: sledge's own DHCP leases (enrollment must then come from the MAC's lease); None
    when sledge runs no DHCP. `bmc_connector`: makes a Bmc for an address (tests pass fakes)."""
    hub = Hub()
    policy = Policy(
        lease_seconds=config.lease_seconds,
        heartbeat_seconds=config.heartbeat_seconds,
        poll_seconds=config.max_poll_seconds,
        enrollment_ttl=config.enrollment_ttl,
        sources=config.sources,
        discovery=config.discovery,
    )
    limiter = FailureLimiter(
        {
            "mac": Limit(config.failures_per_mac, config.failure_window),
            "address": Limit(config.failures_per_address, config.failure_window),
        },
        clock,
    )
    app = web.Application(middlewares=[errors_middleware], client_max_size=config.max_body)
    fleet = Fleet(store, policy, clock, hub.notify)
    app[SERVICES] = Services(
        config=config,
        fleet=fleet,
        enrollment=Enrollment(store, policy, limiter, leases, clock, hub.notify),
        ops=Operations(store, policy.max_attempts, clock, hub.notify),
        hub=hub,
        metrics=Metrics(),
        operator=operator_key or auth.ensure_operator_token(config.data_dir),
        presign=_presigner(config),
        proxies=parse_proxies(config.trusted_proxies),
        tracker=Tracker(
            TrackerPolicy(interval=config.announce_seconds),
            deploying=fleet.deploying,
            on_shun=fleet.shunned,
            wall=clock,  # tickets in the controller's time; its own timers on the monotonic clock
        ),
        power=Power(
            store,
            config.data_dir,
            PowerPolicy(config.bmc_timeout, config.power_poll_seconds, config.boot_deadline),
            clock,
            hub.notify,
            bmc_connector,
        ),
    )
    for route in routes():
        app.router.add_route(route.method, route.path, _guard(route), name=route.handler.__name__)
        if route.path.startswith((STORE_PATH, "/boot/files/")):  # HEAD as a static server answers it
            app.router.add_route("HEAD", route.path, _guard(route))
    app.on_response_prepare.append(files.on_prepare)
    app.cleanup_ctx.append(_reaper)
    app.cleanup_ctx.append(_power_poller)
    app.on_shutdown.append(_on_shutdown)
    return app
