"""The operator API: machines, images, jobs, events (JSON and server-sent events)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from aiohttp import web

from agent.image import layout
from agent.image.store import LocalStore, NotInStore, StoreError
from agent.protocol import JobKind, ProtocolError
from controller.api import views
from controller.api.context import Route, services
from controller.api.wire import query_int, read_body, respond
from controller.fleet.errors import Invalid, NotFound
from controller.fleet.operators import MAX_LIST, Operations
from controller.jobs import JobState
from controller.state.model import Image, Machine


async def list_machines(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    found, bmcs = svc.ops.machines(), svc.power.records()
    shown = tuple(views.MachineView.of(m, bmcs.get(m.id)) for m in found)
    return respond(request, views.MachineList(shown).to_wire())


def machine_detail(ops: Operations, m: Machine, history: int = 20) -> views.MachineDetail:
    bmc = ops.bmc(m.id)
    return views.MachineDetail(
        **views.MachineView.of(m, bmc).__dict__,
        inventory=m.inventory,
        jobs=tuple(map(views.JobView.of, ops.jobs(m.id, (), 20))),
        inventory_history=tuple(map(views.InventoryAt.of, ops.inventory_history(m.id, history))),
        fingerprint=m.fingerprint,
        quarantine=views.QuarantineView.of(m.quarantine, m.fingerprint) if m.quarantine else None,
        events=tuple(map(views.EventView.of, ops.machine_events(m.id))),
        bmc=views.BmcView.of(bmc) if bmc else None,
        bmc_suggested=m.inventory.bmc_address if m.inventory else None,
    )


async def show_machine(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    m = ops.machine(request.match_info["machine"])
    return respond(request, machine_detail(ops, m, query_int(request, "history", 20, 0, 1000)).to_wire())


async def patch_machine(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, views.MachinePatch.from_wire)
    if body.desired_image:
        layout.parse_ref(body.desired_image)
    svc = services(request)
    machine = svc.ops.set_desired(
        request.match_info["machine"], body.desired_image, body.disk_hints, body.kernel_args
    )
    return respond(request, views.MachineView.of(machine, svc.ops.bmc(machine.id)).to_wire())


async def accept_machine(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    return respond(request, machine_detail(ops, ops.accept(request.match_info["machine"])).to_wire())


async def expect_machine(request: web.Request) -> web.StreamResponse:
    machine = services(request).ops.expect(request.match_info["machine"])
    return respond(request, views.MachineView.of(machine).to_wire(), status=201)


async def delete_machine(request: web.Request) -> web.StreamResponse:
    machine = services(request).ops.delete_machine(request.match_info["machine"])
    return respond(request, views.Deleted(machine.id).to_wire())


def image_from_store(ops: Operations, store: LocalStore, ref: str, now: float) -> Image:
    """NAME[:VERSION]: the registered image, else register it from the chunk store's catalog."""
    name, version = layout.parse_ref(ref)
    if version is not None and (found := ops.image(name, version)) is not None:
        return found
    try:
        entry = store.resolve(ref)
        manifest = store.manifest(entry.digest)
    except NotInStore as exc:
        raise NotFound(f"image {ref!r}: not registered and not in the chunk store ({exc})") from None
    except StoreError as exc:
        raise Invalid(f"image {ref!r}: {exc}") from None
    image = Image(
        entry.name, entry.version, entry.digest, manifest.image_size, manifest.data_size, len(manifest), now
    )
    return ops.register_image(image)


async def list_images(request: web.Request) -> web.StreamResponse:
    found = services(request).ops.images()
    return respond(request, views.ImageList(tuple(map(views.ImageView.of, found))).to_wire())


async def register_image(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, views.ImageRegister.from_wire)
    svc = services(request)
    image = image_from_store(svc.ops, LocalStore(svc.config.store_dir), body.ref, time.time())
    return respond(request, views.ImageView.of(image).to_wire(), status=201)


async def create_job(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, views.JobCreate.from_wire)
    svc = services(request)
    params = body.params
    if body.image:
        image = image_from_store(svc.ops, LocalStore(svc.config.store_dir), body.image, time.time())
        params = dataclasses.replace(
            params, image_name=image.name, image_version=image.version, manifest_digest=image.digest
        )
    elif body.kind is JobKind.DEPLOY:
        raise ProtocolError("image", "NAME[:VERSION] of the image to deploy", "nothing")
    job = svc.ops.create_job(body.machine, body.kind, params)
    svc.power.job_created(job.id)  # a machine that is off or runs its own OS is powered up for it
    return respond(request, views.JobView.of(job).to_wire(), status=201)


def _states(request: web.Request) -> tuple[JobState, ...]:
    text = request.query.get("state", "")
    try:
        return tuple(JobState(s) for s in text.split(",") if s)
    except ValueError:
        raise ProtocolError("state", f"states among {', '.join(s.value for s in JobState)}", text) from None


async def list_jobs(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    limit = query_int(request, "limit", 100, 1, MAX_LIST)
    found = ops.jobs(request.query.get("machine") or None, _states(request), limit)
    return respond(request, views.JobList(tuple(map(views.JobView.of, found))).to_wire())


async def show_job(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    job = ops.job(request.match_info["job_id"])
    events = tuple(map(views.EventView.of, ops.events(job.id)))
    return respond(request, views.JobDetail(**views.JobView.of(job).__dict__, events=events).to_wire())


async def cancel_job(request: web.Request) -> web.StreamResponse:
    job = services(request).ops.cancel_job(request.match_info["job_id"])
    return respond(request, views.JobView.of(job).to_wire())


async def list_events(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    after = query_int(request, "after", 0, 0, 1 << 62)
    limit = query_int(request, "limit", MAX_LIST, 1, MAX_LIST)
    found = ops.events(request.query.get("job") or None, after, limit)
    return respond(request, views.EventList(tuple(map(views.EventView.of, found))).to_wire())


async def stream_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every event after `after` (or Last-Event-ID), then new ones as they come."""
    svc = services(request)
    header = request.headers.get("Last-Event-ID", "0")
    if not header.isdigit():
        raise ProtocolError("Last-Event-ID", "an event id (digits)", header)
    last = query_int(request, "after", int(header), 0, 1 << 62)
    job_id = request.query.get("job") or None
    svc.ops.events(job_id, 0, 1)  # 404 for an unknown job before the stream starts
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        while not svc.stopping.is_set():
            batch = svc.ops.events(job_id, last, MAX_LIST)
            for event in batch:
                data = json.dumps(views.EventView.of(event).to_wire(), separators=(",", ":"))
                await response.write(f"id: {event.id}\nevent: {event.kind.value}\ndata: {data}\n\n".encode())
                last = event.id
            if not batch:
                await response.write(b": keep-alive\n\n")
                await svc.hub.wait_any(15.0)
            await asyncio.sleep(0)
    except ConnectionError:
        pass  # the client went away
    return response


ROUTES = (
    Route("GET", "/v1/machines", list_machines, "List machines", response="MachineList"),
    Route(
        "GET",
        "/v1/machines/{machine}",
        show_machine,
        "Show a machine (id, MAC or hostname) with inventory",
        response="MachineDetail",
        params=("history",),
    ),
    Route(
        "PATCH",
        "/v1/machines/{machine}",
        patch_machine,
        "Set the desired image and disk hints",
        request="MachinePatch",
        response="Machine",
    ),
    Route("DELETE", "/v1/machines/{machine}", delete_machine, "Forget a machine", response="Deleted"),
    Route(
        "POST",
        "/v1/machines/{machine}/accept",
        accept_machine,
        "Accept a quarantined machine's new hardware (its fingerprint becomes the bound one)",
        response="MachineDetail",
    ),
    Route(
        "POST",
        "/v1/machines/{machine}/expect",
        expect_machine,
        "Expect a MAC: it may enroll once even with discovery closed (a machine record is made)",
        response="Machine",
    ),
    Route("GET", "/v1/images", list_images, "List registered images", response="ImageList"),
    Route(
        "POST",
        "/v1/images",
        register_image,
        "Register NAME[:VERSION] from the chunk store",
        request="ImageRegister",
        response="Image",
    ),
    Route(
        "GET",
        "/v1/jobs",
        list_jobs,
        "List jobs, newest first",
        response="JobList",
        params=("machine", "state", "limit"),
    ),
    Route("POST", "/v1/jobs", create_job, "Create a job", request="JobCreate", response="Job"),
    Route("GET", "/v1/jobs/{job_id}", show_job, "Show a job with its events", response="JobDetail"),
    Route("POST", "/v1/jobs/{job_id}/cancel", cancel_job, "Cancel a queued or running job", response="Job"),
    Route(
        "GET",
        "/v1/events",
        list_events,
        "Events in the order recorded",
        response="EventList",
        params=("job", "after", "limit"),
    ),
    Route(
        "GET",
        "/v1/events/stream",
        stream_events,
        "Events as server-sent events",
        response="EventStream",
        params=("job", "after"),
    ),
)
