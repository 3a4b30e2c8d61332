"""The agent API under /v1/agent: register, heartbeat, long-poll, events, finish.

Every route but register takes the agent's bearer token, which names one machine;
a job of any other machine is "not found", whether or not it exists.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from agent import protocol as p
from controller.api.context import Route, machine_of, peer, services
from controller.api.views import Health, JobStateReply
from controller.api.wire import error, query_float, read_body, respond
from controller.fleet.enrollment import EnrollmentDenied


async def register(request: web.Request) -> web.StreamResponse:
    message = await read_body(request, p.RegisterRequest.from_wire)
    svc = services(request)
    try:
        reply = svc.enrollment.register(message, peer(request))
    except EnrollmentDenied as exc:
        svc.metrics.refused(exc.reason)
        if exc.retry_after is None:
            raise
        response = error(429, str(exc))
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response
    return respond(request, reply.to_wire())


async def heartbeat(request: web.Request) -> web.StreamResponse:
    message = await read_body(request, p.Heartbeat.from_wire)
    reply = services(request).fleet.heartbeat(machine_of(request), message)
    return respond(request, reply.to_wire())


async def post_inventory(request: web.Request) -> web.StreamResponse:
    inventory = await read_body(request, p.read_inventory)
    services(request).fleet.update_inventory(machine_of(request), inventory)
    return respond(request, Health(True).to_wire())


async def next_job(request: web.Request) -> web.StreamResponse:
    """Answer with a job at once if there is one, else when one arrives or `wait` seconds pass (204)."""
    svc = services(request)
    wait = query_float(request, "wait", svc.config.max_poll_seconds, 0.0, svc.config.max_poll_seconds)
    machine_id = machine_of(request)
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        assignment = svc.fleet.claim(machine_id)
        if assignment is not None:
            return respond(request, assignment.to_wire())
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0 or svc.stopping.is_set():
            return web.Response(status=204)
        await svc.hub.wait_machine(machine_id, left)


async def post_events(request: web.Request) -> web.StreamResponse:
    batch = await read_body(request, p.EventBatch.from_wire)
    ack = services(request).fleet.post_events(machine_of(request), request.match_info["job_id"], batch)
    return respond(request, ack.to_wire())


async def finish(request: web.Request) -> web.StreamResponse:
    message = await read_body(request, p.FinishRequest.from_wire)
    job = services(request).fleet.finish(machine_of(request), request.match_info["job_id"], message)
    return respond(request, JobStateReply(job.id, job.state).to_wire())


async def announce(request: web.Request) -> web.StreamResponse:
    """A deploying agent's tracker announce: what it holds; peers, its origin share and a ticket back."""
    message = await read_body(request, p.Announce.from_wire)
    svc = services(request)
    machine_id = machine_of(request)
    svc.fleet.check_deploying(machine_id, message.job_id, message.manifest_digest, message.chunks)
    reply = svc.tracker.announce(machine_id, peer(request), message)
    return respond(request, reply.to_wire())


ROUTES = (
    Route(
        "POST",
        p.REGISTER_PATH,
        register,
        "Enroll with a one-time token; get a machine id and agent token",
        auth="none",
        request="RegisterRequest",
        response="RegisterReply",
    ),
    Route(
        "POST",
        p.HEARTBEAT_PATH,
        heartbeat,
        "Say the agent is alive; renews the running job's lease",
        auth="agent",
        request="Heartbeat",
        response="HeartbeatReply",
    ),
    Route(
        "POST",
        p.INVENTORY_PATH,
        post_inventory,
        "Replace this machine's inventory (kept in its history)",
        auth="agent",
        request="Inventory",
        response="Health",
    ),
    Route(
        "GET",
        p.NEXT_JOB_PATH,
        next_job,
        "Long-poll for this machine's next job (204 after `wait` s)",
        auth="agent",
        response="Assignment",
        params=("wait",),
    ),
    Route(
        "POST",
        p.PEERS_PATH,
        announce,
        "Announce the chunks a deploy job holds; get peers, an origin share and a peer ticket",
        auth="agent",
        request="Announce",
        response="AnnounceReply",
    ),
    Route(
        "POST",
        p.job_events_path("{job_id}"),
        post_events,
        "Append events; idempotent by seq",
        auth="agent",
        request="EventBatch",
        response="EventAck",
    ),
    Route(
        "POST",
        p.job_finish_path("{job_id}"),
        finish,
        "Finish a job with its result",
        auth="agent",
        request="FinishRequest",
        response="JobState",
    ),
)
