"""Bad input gets a 4xx naming the field and the expectation, never a 500, and changes nothing.

A real controller runs on 127.0.0.1 in a thread (one per module) with a real SQLite file;
the state is compared as a full SQL dump before and after each refused request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import (
    HEARTBEAT_PATH,
    NEXT_JOB_PATH,
    REGISTER_PATH,
    EventBatch,
    FinishRequest,
    Heartbeat,
    ProtocolError,
    RegisterRequest,
    job_events_path,
    job_finish_path,
)
from controller.app import make_app
from controller.auth import ensure_operator_token, operator_token_path
from controller.config import Config
from controller.state.sqlite import SqliteStore
from tests.unit.test_controller_kit import event, inventory


@dataclass
class Live:
    url: str
    store: SqliteStore
    operator: str
    agent: str
    job_id: str
    lock: threading.Lock

    def dump(self) -> str:
        with self.lock:
            return "\n".join(self.store.db.iterdump())

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = None,
        ctype: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Content-Type", ctype)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw, status, kind = response.read(), response.status, response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        if not raw:
            return status, {}
        return status, msgpack.unpackb(raw) if kind.startswith("application/msgpack") else json.loads(raw)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("bad-input")
    config = Config(data_dir=tmp / "data", max_poll_seconds=0.1, max_body=64 << 10)
    store = SqliteStore(tmp / "state.db")
    key = ensure_operator_token(config.data_dir)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(config, store, operator_key=key))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    operator = operator_token_path(config.data_dir).read_text().strip()
    live = Live(f"http://127.0.0.1:{port}", store, operator, "", "", threading.Lock())
    mac = "52:54:00:00:00:01"
    with urllib.request.urlopen(f"{live.url}/boot/ipxe?mac={mac}") as r:
        token = r.read().decode().split("sledge.token=")[1].split()[0]
    body = json.dumps({"enrollment_token": token, "inventory": inventory(macs=(mac,)).to_wire()}).encode()
    status, reply = live.call("POST", REGISTER_PATH, body)
    assert status == 200
    live.agent = reply["agent_token"]
    status, job = live.call(
        "POST", "/v1/jobs", json.dumps({"machine": mac, "kind": "inventory"}).encode(), live.operator
    )
    live.job_id = job["id"]
    status, _ = live.call("GET", f"{NEXT_JOB_PATH}?wait=0", None, live.agent)
    assert status == 200
    yield live
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    store.close()


def refused(
    live: Live, method: str, path: str, body: bytes, token: str | None, ctype: str = "application/json"
) -> dict[str, Any]:
    before = live.dump()
    status, reply = live.call(method, path, body, token, ctype)
    assert 400 <= status < 500, (status, reply, body[:200])
    assert isinstance(reply.get("error"), str) and reply["error"], reply
    assert live.dump() == before
    return reply


def endpoints(live: Live) -> list[tuple[str, str, str | None]]:
    return [
        ("POST", REGISTER_PATH, None),
        ("POST", HEARTBEAT_PATH, live.agent),
        ("POST", job_events_path(live.job_id), live.agent),
        ("POST", job_finish_path(live.job_id), live.agent),
        ("POST", "/v1/jobs", live.operator),
        ("POST", "/v1/images", live.operator),
        ("PATCH", "/v1/machines/52:54:00:00:00:01", live.operator),
    ]


@pytest.mark.parametrize(
    ("body", "ctype", "message"),
    [
        (b"{", "application/json", "field '<body>': expected well-formed JSON"),
        (b'{"a": NaN}', "application/json", "expected finite numbers only"),
        (b'{"a": 1, "a": 2}', "application/json", "expected each key once"),
        (b"\xc1", "application/msgpack", "field '<body>': expected well-formed msgpack"),
        (b"<xml/>", "text/xml", "field '<content-type>': expected application/json or application/msgpack"),
        (b"[]", "application/json", "field '<body>': expected an object"),
        (b'{"zzz": 1}', "application/json", "'zzz': expected one of the fields"),
    ],
)
def test_malformed_bodies(live: Live, body: bytes, ctype: str, message: str) -> None:
    for method, path, token in endpoints(live):
        assert message in refused(live, method, path, body, token, ctype)["error"], path


def test_oversize_body(live: Live) -> None:
    body = json.dumps({"attempt": 1, "events": [event(1, "x" * 4000)] * 20}).encode()
    assert len(body) > 64 << 10
    reply = refused(live, "POST", job_events_path(live.job_id), body, live.agent)
    assert "at most 65536 bytes" in reply["error"]


@pytest.mark.parametrize(
    ("path", "body", "field", "expected"),
    [
        (REGISTER_PATH, {"enrollment_token": 5, "inventory": {}}, "enrollment_token", "a string"),
        (REGISTER_PATH, {"enrollment_token": "x"}, "inventory", "a value (required)"),
        (HEARTBEAT_PATH, {"job_id": "../etc"}, "job_id", "a string matching"),
        (HEARTBEAT_PATH, {"job_id": "j-0123456789ab", "cpu": 1}, "cpu", "one of the fields"),
        ("EVENTS", {"attempt": "1", "events": []}, "attempt", "an integer in [1, 2147483648]"),
        (
            "EVENTS",
            {"attempt": 1, "events": [{"seq": 1, "at": 1.0, "kind": "shout"}]},
            "events[0].kind",
            "one of stage",
        ),
        ("EVENTS", {"attempt": 1, "events": [event(1), event(3)]}, "events[1].seq", "2 (consecutive)"),
        (
            "EVENTS",
            {"attempt": 1, "events": [{**event(1), "done": -1}]},
            "events[0].done",
            "an integer in [0,",
        ),
        (
            "FINISH",
            {"attempt": 1, "result": {"outcome": "maybe"}},
            "result.outcome",
            "one of succeeded, failed",
        ),
        ("/v1/jobs", {"machine": "52:54:00:00:00:01", "kind": "explode"}, "kind", "one of deploy, erase"),
        ("/v1/jobs", {"machine": "x", "kind": "deploy"}, "image", "NAME[:VERSION]"),
        (
            "/v1/jobs",
            {"machine": "x", "kind": "erase", "params": {"disk": {"colour": "red"}}},
            "params.disk.colour",
            "",
        ),
        (
            "/v1/jobs",
            {"machine": "x", "kind": "erase", "params": {"erase_mode": 3}},
            "params.erase_mode",
            "metadata",
        ),
    ],
)
def test_wrong_types_and_fields_are_named(
    live: Live, path: str, body: dict[str, Any], field: str, expected: str
) -> None:
    path = {
        "EVENTS": job_events_path(live.job_id),
        "FINISH": job_finish_path(live.job_id),
    }.get(path, path)
    token = None if path.endswith("register") else live.operator if path == "/v1/jobs" else live.agent
    reply = refused(live, "POST", path, json.dumps(body).encode(), token)
    assert reply["field"] == field and expected in reply["error"], reply


@pytest.mark.parametrize(
    ("method", "path", "operator", "message"),
    [
        (
            "GET",
            "/v1/machines/m-000000000000",
            True,
            "machine 'm-000000000000': no machine with that id, MAC or hostname",
        ),
        ("GET", "/v1/jobs/j-000000000000", True, "job 'j-000000000000': no such job"),
        ("POST", "/v1/jobs/nope/cancel", True, "job 'nope': no such job"),
        ("GET", "/v1/jobs?state=sleeping", True, "field 'state': expected states among queued"),
        ("GET", "/v1/events?after=-1", True, "field 'after': expected an integer in [0,"),
        ("GET", "/v1/nothing-here", True, "GET /v1/nothing-here: Not Found"),
        ("DELETE", "/v1/jobs", True, "Method Not Allowed"),
        ("GET", "/boot/ipxe?mac=zz", False, "field 'mac': expected a MAC address"),
        ("GET", "/boot/ipxe", False, "field 'mac': expected the booting NIC's MAC"),
        (
            "POST",
            job_finish_path("j-000000000000"),
            False,
            "job j-000000000000: no such job for machine",
        ),
    ],
)
def test_unknown_ids_and_bad_queries(
    live: Live, method: str, path: str, operator: bool, message: str
) -> None:
    body = json.dumps({"attempt": 1, "result": {"outcome": "failed"}}).encode() if method == "POST" else None
    token = live.operator if operator else live.agent
    before = live.dump()
    status, reply = live.call(method, path, body, token)
    assert 400 <= status < 500 and message in reply["error"], (status, reply)
    if not path.startswith("/boot"):
        assert live.dump() == before


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
_keys = st.sampled_from(
    [
        "attempt",
        "events",
        "result",
        "job_id",
        "status",
        "enrollment_token",
        "inventory",
        "machine",
        "kind",
        "image",
        "params",
        "ref",
        "seq",
        "at",
        "outcome",
    ]
)
_shaped = st.dictionaries(_keys, _json, max_size=4)
_parsers = {
    REGISTER_PATH: RegisterRequest.from_wire,
    HEARTBEAT_PATH: Heartbeat.from_wire,
    "events": EventBatch.from_wire,
    "finish": FinishRequest.from_wire,
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_json | _shaped, which=st.integers(0, 6), as_msgpack=st.booleans())
def test_fuzzed_bodies_never_500_and_refusals_change_nothing(
    live: Live, body: object, which: int, as_msgpack: bool
) -> None:
    method, path, token = endpoints(live)[which]
    try:
        data = msgpack.packb(body) if as_msgpack else json.dumps(body).encode()
    except (OverflowError, ValueError):
        return
    before = live.dump()
    status, reply = live.call(
        method, path, data, token, "application/msgpack" if as_msgpack else "application/json"
    )
    assert status != 500 and status < 500, (status, reply)
    if status >= 400:
        assert reply["error"] and live.dump() == before
    else:
        parse = _parsers.get(path) or _parsers.get(path.rsplit("/", 1)[-1])
        if parse is not None:  # the controller accepted it: so must the protocol's own parser
            try:
                parse(body)
            except ProtocolError as exc:
                pytest.fail(f"accepted {body!r} at {path}, which the protocol refuses: {exc}")
