"""Bodies in and out (JSON or msgpack), and errors as one JSON line: never a 500 for bad input."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from agent.image.layout import LayoutError
from agent.protocol import JSON, MSGPACK, ProtocolError, decode_body, encode_body, media_type
from controller.api.context import Handler, services
from controller.api.views import ErrorReply
from controller.auth import AuthError
from controller.fleet.errors import Conflict, Denied, Invalid, NotFound
from controller.power.errors import BmcAddressError, BmcError, PowerError, VaultError

log = logging.getLogger("sledge.api")
T = TypeVar("T")


def error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response(ErrorReply(message, status, field).to_wire(), status=status)


_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (Invalid, 400),
    (Denied, 401),
    (AuthError, 401),
    (LayoutError, 400),
    (BmcAddressError, 400),
    (BmcError, 502),  # the BMC behind us failed or did not answer
    (VaultError, 500),  # the controller's own key file: its message says what to fix
    (PowerError, 400),
)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ProtocolError as exc:
        status = 400
        return error(400, str(exc), exc.field)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        if exc.status == 413:
            limit = services(request).config.max_body
            return error(413, f"request body: expected at most {limit} bytes, got more")
        return error(exc.status, f"{request.method} {request.path}: {exc.reason}")
    except Exception as exc:
        for kind, code in _STATUS:
            if isinstance(exc, kind):
                status = code
                return error(code, str(exc))
        log.exception("internal error in %s %s", request.method, request.path)
        return error(500, "internal error (logged by the controller)")
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "<unmatched>"
        services(request).metrics.observe(request.method, name, status, time.monotonic() - start)


async def read_body(request: web.Request, parse: Callable[[object], T]) -> T:
    """Decode the body by Content-Type and parse it into a message; ProtocolError on any mismatch."""
    limit = services(request).config.max_body
    if request.content_length is not None and request.content_length > limit:
        raise ProtocolError("<body>", f"at most {limit} bytes", f"{request.content_length} bytes")
    data = await request.read()
    return parse(decode_body(data, request.headers.get("Content-Type", JSON), limit))


def respond(request: web.Request, wire: object, status: int = 200) -> web.Response:
    """JSON, or msgpack when the client asked for it (Accept) or spoke it."""
    accept = request.headers.get("Accept", "")
    spoke = media_type(request.headers.get("Content-Type", ""))
    kind = MSGPACK if MSGPACK in accept or spoke == MSGPACK else JSON
    return web.Response(body=encode_body(wire, kind), status=status, content_type=kind)


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ProtocolError(name, f"an integer in [{lo}, {hi}]", text) from None
    if not lo <= value <= hi:
        raise ProtocolError(name, f"an integer in [{lo}, {hi}]", value)
    return value


def query_float(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError(name, f"a number in [{lo}, {hi}]", text) from None
    if not lo <= value <= hi:
        raise ProtocolError(name, f"a number in [{lo}, {hi}]", value)
    return value
