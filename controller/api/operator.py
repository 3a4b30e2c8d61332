"""The operator API: machines, images, jobs, events (JSON and server-sent events)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from aiohttp import web

from agent.image import layout
from agent.image.store import LocalStore, NotInStore, StoreError
from agent.protocol import DiskHints, Fields, JobKind, JobParams, ProtocolError
from controller.api import views
from controller.api.context import Route, services
from controller.api.wire import query_int, read_body, respond
from controller.fleet.errors import Invalid, NotFound
from controller.fleet.operators import MAX_LIST, Operations
from controller.jobs import JobState
from controller.state.model import Image


async def list_machines(request: web.Request) -> web.StreamResponse:
    return respond(request, {"machines": [views.machine(m) for m in services(request).ops.machines()]})


async def show_machine(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    ref = request.match_info["machine"]
    machine = ops.machine(ref)
    view = views.machine(machine, detail=True)
    view["jobs"] = [views.job(j) for j in ops.jobs(machine.id, (), 20)]
    view["events"] = [views.event(e) for e in ops.machine_events(machine.id)]
    view["inventory_history"] = [
        {"at": r.at} for r in ops.inventory_history(machine.id, query_int(request, "history", 20, 0, 1000))
    ]
    return respond(request, view)


async def patch_machine(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, lambda o: Fields(o, "", ("desired_image", "disk_hints")))
    image = body.text("desired_image", None, max_len=257)
    if image:
        layout.parse_ref(image)
    hints = DiskHints.from_wire(body.obj["disk_hints"], "disk_hints") if "disk_hints" in body.obj else None
    machine = services(request).ops.set_desired(request.match_info["machine"], image, hints)
    return respond(request, views.machine(machine))


async def accept_machine(request: web.Request) -> web.StreamResponse:
    machine = services(request).ops.accept(request.match_info["machine"])
    return respond(request, views.machine(machine, detail=True))


async def expect_machine(request: web.Request) -> web.StreamResponse:
    machine = services(request).ops.expect(request.match_info["machine"])
    return respond(request, views.machine(machine), status=201)


async def delete_machine(request: web.Request) -> web.StreamResponse:
    machine = services(request).ops.delete_machine(request.match_info["machine"])
    return respond(request, {"deleted": machine.id})


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
    return respond(request, {"images": [views.image(i) for i in services(request).ops.images()]})


async def register_image(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, lambda o: Fields(o, "", ("ref",)))
    svc = services(request)
    image = image_from_store(
        svc.ops, LocalStore(svc.config.store_dir), body.text("ref", max_len=257), time.time()
    )
    return respond(request, views.image(image), status=201)


async def create_job(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, lambda o: Fields(o, "", ("machine", "kind", "image", "params")))
    svc = services(request)
    kind = body.choice("kind", JobKind)
    params = JobParams.from_wire(body.obj.get("params", {}), "params")
    image_ref = body.text("image", "", max_len=257)
    if image_ref:
        image = image_from_store(svc.ops, LocalStore(svc.config.store_dir), image_ref, time.time())
        params = dataclasses.replace(
            params, image_name=image.name, image_version=image.version, manifest_digest=image.digest
        )
    elif kind is JobKind.DEPLOY:
        raise ProtocolError("image", "NAME[:VERSION] of the image to deploy", "nothing")
    job = svc.ops.create_job(body.text("machine", max_len=257), kind, params)
    return respond(request, views.job(job), status=201)


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
    return respond(request, {"jobs": [views.job(j) for j in found]})


async def show_job(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    job = ops.job(request.match_info["job_id"])
    return respond(request, {**views.job(job), "events": [views.event(e) for e in ops.events(job.id)]})


async def cancel_job(request: web.Request) -> web.StreamResponse:
    return respond(request, views.job(services(request).ops.cancel_job(request.match_info["job_id"])))


async def list_events(request: web.Request) -> web.StreamResponse:
    ops = services(request).ops
    after = query_int(request, "after", 0, 0, 1 << 62)
    limit = query_int(request, "limit", MAX_LIST, 1, MAX_LIST)
    found = ops.events(request.query.get("job") or None, after, limit)
    return respond(request, {"events": [views.event(e) for e in found]})


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
                data = json.dumps(views.event(event), separators=(",", ":"))
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
