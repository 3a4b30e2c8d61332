"""The operator API's BMC and power routes (docs/power.md)."""

from __future__ import annotations

from aiohttp import web

from agent.protocol import ProtocolError
from controller.api import views
from controller.api.context import Route, services
from controller.api.wire import read_body, respond
from controller.power.bmc import PowerAction


async def set_bmc(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, views.BmcSet.from_wire)
    _, record = services(request).power.set_bmc(
        request.match_info["machine"], body.address, body.username, body.password
    )
    return respond(request, views.BmcView.of(record).to_wire(), status=201)


async def show_bmc(request: web.Request) -> web.StreamResponse:
    _, record = services(request).power.record(request.match_info["machine"])
    return respond(request, views.BmcView.of(record).to_wire())


async def delete_bmc(request: web.Request) -> web.StreamResponse:
    machine = services(request).power.delete_bmc(request.match_info["machine"])
    return respond(request, views.Deleted(machine.id).to_wire())


async def power(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, views.PowerRequest.from_wire)
    try:
        action = PowerAction(body.action)
    except ValueError:
        raise ProtocolError(
            "action", "one of " + ", ".join(a.value for a in PowerAction), body.action
        ) from None
    record = await services(request).power.act(request.match_info["machine"], action)
    return respond(request, views.BmcView.of(record).to_wire())


M = "/v1/machines/{machine}"
ROUTES = (
    Route(
        "PUT",
        f"{M}/bmc",
        set_bmc,
        "Set a machine's BMC (the password is sealed at rest and never shown)",
        request="BmcSet",
        response="Bmc",
    ),
    Route("GET", f"{M}/bmc", show_bmc, "Show a machine's BMC record and last polled power", response="Bmc"),
    Route("DELETE", f"{M}/bmc", delete_bmc, "Forget a machine's BMC", response="Deleted"),
    Route(
        "POST",
        f"{M}/power",
        power,
        "Power on, off, cycle or ask the status through the machine's BMC",
        request="PowerRequest",
        response="Bmc",
    ),
)
