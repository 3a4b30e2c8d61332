"""The OpenAPI 3 document, written from the route tables (tests hold it to the router)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from controller.api.context import Route

_OBJ: dict[str, Any] = {"type": "object"}
_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_NUM: dict[str, Any] = {"type": "number"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: Iterable[str] = (), strict: bool = True, **props: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    if strict:
        schema["additionalProperties"] = False
    return schema


def _list(key: str, item: str) -> dict[str, Any]:
    items: dict[str, Any] = {"type": "array", "items": _ref(item)}
    return {"type": "object", "properties": {key: items}, "required": [key], "additionalProperties": False}


_HINTS = {
    "type": "object",
    "additionalProperties": _STR,
    "description": "root device hints: serial, wwn, size...",
}
_EVENT = _object(
    ("seq", "at", "kind"),
    seq=_INT,
    at=_NUM,
    kind={"enum": ["stage", "progress", "log", "warning", "error"]},
    message=_STR,
    done=_INT,
    total=_INT,
)
_PARAMS = _object(
    image_name=_STR,
    image_version=_STR,
    manifest_digest=_STR,
    disk=_HINTS,
    erase_mode={"enum": ["metadata", "full"]},
    power={"enum": ["reboot", "poweroff"]},
    cloud_init=_object(user_data=_STR, meta_data=_STR, network_config=_STR),
)
_KIND = {"enum": ["deploy", "erase", "verify", "inventory", "reboot"]}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(("error", "status"), error=_STR, status=_INT, field=_STR),
    "RegisterRequest": _object(
        ("enrollment_token", "inventory"),
        enrollment_token=_STR,
        agent_version=_STR,
        inventory={**_OBJ, "description": "agent.hardware.model.Inventory (docs/inventory.md)"},
    ),
    "Inventory": {**_OBJ, "description": "agent.hardware.model.Inventory (docs/inventory.md)"},
    "Health": _object(("ok",), ok={"type": "boolean"}),
    "RegisterReply": _object(
        ("machine_id", "agent_token", "heartbeat_seconds", "poll_seconds"),
        machine_id=_STR,
        agent_token=_STR,
        heartbeat_seconds=_NUM,
        poll_seconds=_NUM,
    ),
    "Heartbeat": _object(job_id={"type": ["string", "null"]}, status=_STR),
    "HeartbeatReply": _object(("cancel",), cancel={"type": "array", "items": _STR}),
    "JobParams": _PARAMS,
    "Assignment": _object(
        ("job_id", "kind", "attempt", "next_seq", "lease_seconds", "params"),
        job_id=_STR,
        kind=_KIND,
        attempt=_INT,
        next_seq=_INT,
        lease_seconds=_NUM,
        params=_ref("JobParams"),
        sources={"type": "array", "items": _STR},
    ),
    "Event": _EVENT,
    "EventBatch": _object(
        ("attempt", "events"), attempt=_INT, events={"type": "array", "items": _ref("Event")}
    ),
    "EventAck": _object(("next_seq",), next_seq=_INT),
    "JobResult": _object(
        ("outcome",),
        outcome={"enum": ["succeeded", "failed"]},
        message=_STR,
        disk=_STR,
        bytes_written=_INT,
        bytes_fetched=_INT,
    ),
    "FinishRequest": _object(("attempt", "result"), attempt=_INT, result=_ref("JobResult")),
    "JobState": _object(("job_id", "state"), job_id=_STR, state=_STR),
    "Machine": _object(
        strict=False,
        id=_STR,
        state=_STR,
        hostname=_STR,
        macs={"type": "array", "items": _STR},
        expected={"type": "boolean", "description": "may enroll once with discovery closed"},
    ),
    "Fingerprint": _object(
        ("system_uuid", "disks", "macs"),
        system_uuid=_STR,
        disks={"type": "array", "items": _object(serial=_STR, wwn=_STR)},
        macs={"type": "array", "items": _STR},
    ),
    "MachineDetail": _object(
        strict=False,
        id=_STR,
        inventory=_OBJ,
        jobs={"type": "array", "items": _ref("Job")},
        fingerprint={
            "oneOf": [_ref("Fingerprint"), {"type": "null"}],
            "description": "bound at the first registration",
        },
        quarantine={
            "oneOf": [
                _object(
                    strict=False,
                    at=_NUM,
                    address=_STR,
                    previous_state=_STR,
                    fingerprint=_ref("Fingerprint"),
                    changes={"type": "array", "items": _STR},
                ),
                {"type": "null"},
            ]
        },
        events={"type": "array", "items": _ref("EventRecord")},
    ),
    "MachineList": _list("machines", "Machine"),
    "MachinePatch": _object(desired_image=_STR, disk_hints=_HINTS),
    "Deleted": _object(("deleted",), deleted=_STR),
    "Image": _object(strict=False, name=_STR, version=_STR, digest=_STR, image_size=_INT),
    "ImageList": _list("images", "Image"),
    "ImageRegister": _object(("ref",), ref=_STR),
    "JobCreate": _object(("machine", "kind"), machine=_STR, kind=_KIND, image=_STR, params=_ref("JobParams")),
    "Job": _object(
        strict=False, id=_STR, machine_id=_STR, kind=_KIND, state=_STR, attempts=_INT, reason=_STR
    ),
    "JobDetail": _object(strict=False, id=_STR, events={"type": "array", "items": _ref("EventRecord")}),
    "JobList": _list("jobs", "Job"),
    "EventRecord": _object(
        strict=False,
        id=_INT,
        job_id={"type": ["string", "null"], "description": "null: an event of the machine (quarantine)"},
        seq={"type": ["integer", "null"]},
        source=_STR,
    ),
    "EventList": _list("events", "EventRecord"),
}

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
    schema = _ref(route.response) if route.response in SCHEMAS else {"type": "string"}
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
            "schemas": SCHEMAS,
            "securitySchemes": {
                "operator": {"type": "http", "scheme": "bearer", "description": "DATA/operator.token"},
                "agent": {"type": "http", "scheme": "bearer", "description": "from /v1/agent/register"},
            },
        },
    }
