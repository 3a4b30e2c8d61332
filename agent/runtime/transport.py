"""Talking to the controller's agent API: one narrow interface, an HTTP implementation.

TransportError       the controller could not be reached or answered 5xx: retry later
├── Unauthorized     401: the agent token (or enrollment token) is refused: re-enroll
├── Conflict         409: the job moved on (stale attempt, cancelled): stop it
└── Rejected         other 4xx: the request itself is wrong; retrying will not help
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable
from typing import Protocol, TypeVar

from agent import protocol as p
from agent.endpoint import Endpoint
from agent.hardware.model import Inventory
from agent.runtime.errors import AgentError

USER_AGENT = "sledge-agent"
T = TypeVar("T")


class TransportError(AgentError):
    pass


class Unauthorized(TransportError):
    pass


class Conflict(TransportError):
    pass


class Rejected(TransportError):
    pass


class Transport(Protocol):
    def register(self, request: p.RegisterRequest) -> p.RegisterReply: ...

    def heartbeat(self, token: str, beat: p.Heartbeat) -> p.HeartbeatReply: ...

    def next_job(self, token: str, wait: float) -> p.Assignment | None: ...

    def post_events(self, token: str, job_id: str, batch: p.EventBatch) -> p.EventAck: ...

    def finish(self, token: str, job_id: str, request: p.FinishRequest) -> None: ...

    def post_inventory(self, token: str, inventory: Inventory) -> None: ...

    def boot_script(self, mac: str) -> str: ...

    def announce(self, token: str, message: p.Announce) -> p.AnnounceReply: ...


class HttpTransport:
    """JSON over HTTP(S) with http.client; a fresh connection per call keeps failure handling simple."""

    def __init__(self, base_url: str, ca_file: str = "", timeout: float = 10.0) -> None:
        self._endpoint = Endpoint.parse(base_url, "controller", ca_file)
        self.base = self._endpoint.url
        self._timeout = timeout

    def _call(
        self, method: str, path: str, token: str = "", body: object = None, timeout: float | None = None
    ) -> tuple[int, bytes]:
        headers = {"User-Agent": USER_AGENT, "Accept": p.JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = p.encode_body(body)
            headers["Content-Type"] = p.JSON
        conn = self._endpoint.connection(timeout or self._timeout)
        try:
            conn.request(method, self._endpoint.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read(p.MAX_BODY + 1)
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"{method} {self.base}{path}: {exc or type(exc).__name__}") from None
        finally:
            conn.close()
        if status >= 500:
            raise TransportError(f"{method} {self.base}{path}: HTTP {status}: {_message(payload)}")
        if status == 401:
            raise Unauthorized(f"{method} {self.base}{path}: refused: {_message(payload)}")
        if status == 409:
            raise Conflict(f"{method} {self.base}{path}: {_message(payload)}")
        if status >= 400:
            raise Rejected(f"{method} {self.base}{path}: HTTP {status}: {_message(payload)}")
        return status, payload

    def _json(self, payload: bytes, what: str) -> object:
        try:
            return p.decode_body(payload, p.JSON)
        except p.ProtocolError as exc:
            raise TransportError(f"{what}: the controller's answer is malformed: {exc}") from None

    def register(self, request: p.RegisterRequest) -> p.RegisterReply:
        _, payload = self._call("POST", p.REGISTER_PATH, body=request.to_wire())
        return _parse(p.RegisterReply.from_wire, self._json(payload, "register"), "register")

    def heartbeat(self, token: str, beat: p.Heartbeat) -> p.HeartbeatReply:
        _, payload = self._call("POST", p.HEARTBEAT_PATH, token, beat.to_wire())
        return _parse(p.HeartbeatReply.from_wire, self._json(payload, "heartbeat"), "heartbeat")

    def next_job(self, token: str, wait: float) -> p.Assignment | None:
        status, payload = self._call("GET", f"{p.NEXT_JOB_PATH}?wait={wait:g}", token, timeout=wait + 15)
        if status == 204:
            return None
        return _parse(p.Assignment.from_wire, self._json(payload, "next job"), "next job")

    def post_events(self, token: str, job_id: str, batch: p.EventBatch) -> p.EventAck:
        _, payload = self._call("POST", p.job_events_path(job_id), token, batch.to_wire())
        return _parse(p.EventAck.from_wire, self._json(payload, "events"), "events")

    def finish(self, token: str, job_id: str, request: p.FinishRequest) -> None:
        self._call("POST", p.job_finish_path(job_id), token, request.to_wire())

    def post_inventory(self, token: str, inventory: Inventory) -> None:
        self._call("POST", p.INVENTORY_PATH, token, inventory.to_wire())

    def announce(self, token: str, message: p.Announce) -> p.AnnounceReply:
        _, payload = self._call("POST", p.PEERS_PATH, token, message.to_wire())
        return _parse(p.AnnounceReply.from_wire, self._json(payload, "peers"), "peers")

    def boot_script(self, mac: str) -> str:
        _, payload = self._call("GET", f"{p.BOOT_SCRIPT_PATH}?mac={urllib.parse.quote(mac)}")
        return payload.decode("utf-8", "replace")


def _message(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        if isinstance(obj, dict) and "error" in obj:
            return str(obj["error"])[:500]
    except ValueError:
        pass
    return payload[:200].decode("utf-8", "replace").strip()


def _parse(read: Callable[[object], T], obj: object, what: str) -> T:
    try:
        return read(obj)
    except p.ProtocolError as exc:
        raise TransportError(f"{what}: the controller's answer is malformed: {exc}") from None
