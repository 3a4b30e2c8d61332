"""The OpenAPI 3 document: paths from the route tables, schemas from the message declarations."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from agent import protocol as p
from agent.hardware.model import Inventory
from agent.wire import schema_of
from controller.api import views
from controller.api.context import Route
from controller.trust.fingerprint import DiskId, Fingerprint

_STR: dict[str, Any] = {"type": "string"}

# Every schema the document publishes, by name: each is derived from its one declaration.
MESSAGES: dict[str, type] = {
    "Error": views.ErrorReply,
    "Health": views.Health,
    "RegisterRequest": p.RegisterRequest,
    "RegisterReply": p.RegisterReply,
    "Inventory": Inventory,
    "Heartbeat": p.Heartbeat,
    "HeartbeatReply": p.HeartbeatReply,
    "Announce": p.Announce,
    "AnnounceReply": p.AnnounceReply,
    "PeerGrant": p.PeerGrant,
    "PeerInfo": p.PeerInfo,
    "Served": p.Served,
    "JobParams": p.JobParams,
    "CloudInit": p.CloudInit,
    "Assignment": p.Assignment,
    "Event": p.Event,
    "EventBatch": p.EventBatch,
    "EventAck": p.EventAck,
    "JobResult": p.JobResult,
    "FinishRequest": p.FinishRequest,
    "JobState": views.JobStateReply,
    "Machine": views.MachineView,
    "MachineDetail": views.MachineDetail,
    "Fingerprint": Fingerprint,
    "DiskId": DiskId,
    "Quarantine": views.QuarantineView,
    "InventoryAt": views.InventoryAt,
    "MachineList": views.MachineList,
    "MachinePatch": views.MachinePatch,
    "Deleted": views.Deleted,
    "Image": views.ImageView,
    "ImageList": views.ImageList,
    "ImageRegister": views.ImageRegister,
    "JobCreate": views.JobCreate,
    "Job": views.JobView,
    "JobDetail": views.JobDetail,
    "JobList": views.JobList,
    "EventRecord": views.EventView,
    "EventList": views.EventList,
    "BmcSet": views.BmcSet,
    "Bmc": views.BmcView,
    "PowerRequest": views.PowerRequest,
}
_NAMES = {cls: name for name, cls in MESSAGES.items()}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def schemas() -> dict[str, dict[str, Any]]:
    """Each published message's JSON Schema; a message inside another is a $ref to its own."""
    return {name: _object_schema(cls) for name, cls in MESSAGES.items()}


def _object_schema(cls: type) -> dict[str, Any]:
    # the class itself is named, so describe its fields rather than refer to itself
    return schema_of(cls, refs=lambda c: None if c is cls else _NAMES.get(c))


_MEDIA = {
    "IpxeScript": "text/plain",
    "Binary": "application/octet-stream",
    "EventStream": "text/event-stream",
    "Metrics": "text/plain",
    "Health": "application/json",
    "OpenAPI": "application/json",
}
_PARAM = re.compile(r"{([^}]+)}")


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__}
    params = [
        {"name": n, "in": "path", "required": True, "schema": _STR} for n in _PARAM.findall(route.path)
    ] + [{"name": n, "in": "query", "required": n == "mac", "schema": _STR} for n in route.params]
    if params:
        op["parameters"] = params
    if route.request:
        op["requestBody"] = {
            "required": True,
            "content": {
                m: {"schema": _ref(route.request)} for m in ("application/json", "application/msgpack")
            },
        }
    created = ("/v1/jobs", "/v1/images", "/v1/machines/{machine}/expect")
    ok = "201" if route.method == "POST" and route.path in created else "200"
    media = _MEDIA.get(route.response or "", "application/json")
    schema = _ref(route.response) if route.response in MESSAGES else _STR
    responses: dict[str, Any] = {ok: {"description": "OK", "content": {media: {"schema": schema}}}}
    if route.path.endswith("/jobs/next"):
        responses["204"] = {"description": "no job within the wait"}
    if route.path.endswith("/register"):
        responses["429"] = {
            "description": "too many failed enrollments from this MAC or address (Retry-After)",
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    for code in ("400", "401", "404", "409", "413"):
        responses[code] = {"description": "error", "content": {"application/json": {"schema": _ref("Error")}}}
    op["responses"] = responses
    if route.auth != "none":
        op["security"] = [{route.auth: []}]
    return op


def document(routes: Iterable[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "sledge controller", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "operator": {"type": "http", "scheme": "bearer", "description": "DATA/operator.token"},
                "agent": {"type": "http", "scheme": "bearer", "description": "from /v1/agent/register"},
            },
        },
    }
