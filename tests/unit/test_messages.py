"""Every wire message is declared once (agent.wire): hold the codecs, the OpenAPI schemas and
the served API to those declarations.

The strategies below are built from the declarations (types and Bounds), independently of
the codec, so a codec, a schema or a handler that drifts from its declaration fails here.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol
from agent.hardware.hints import HINT_NAMES
from agent.hardware.model import Inventory
from agent.protocol import DiskHints, ProtocolError, decode_body, encode_body
from agent.wire import Bound, Message, fields_of
from controller.api import openapi, views
from controller.api.context import SERVICES
from controller.app import routes
from controller.cli import build_parser
from controller.power.bmc import FakeBmc
from controller.trust import fingerprint
from tests.unit.test_controller_kit import AioClient, add_image, event, inventory, start

DOC = openapi.document(routes())
SCHEMAS = DOC["components"]["schemas"]
DECLARED = sorted(
    {
        cls
        for module in (protocol, views, fingerprint)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, Message) and cls is not Message
    },
    key=lambda c: c.__name__,
)
NAME = {cls: name for name, cls in openapi.MESSAGES.items()}
NO_BOUND = Bound()
TEXT = st.characters(blacklist_categories=("Cs",))  # msgpack cannot carry lone surrogates


def validator(name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    return jsonschema.Draft202012Validator(root)


def valid(name: str, wire: object) -> bool:
    return validator(name).is_valid(wire)


# -- strategies from the declarations ------------------------------------------------------------------


def strategy(tp: Any, b: Bound = NO_BOUND) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return st.none() | strategy(inner, b)
    if origin is tuple:
        item = strategy(typing.get_args(tp)[0], Bound(max_len=b.item_len))
        return st.lists(item, max_size=min(b.max_len or 3, 3)).map(tuple)
    if tp is protocol.EventBatch:
        return st.builds(
            lambda attempt, first, events: protocol.EventBatch(
                attempt, tuple(dataclasses.replace(e, seq=first + i) for i, e in enumerate(events))
            ),
            strategy(*fields_of(tp)[0][1:3]),
            st.integers(1, 1000),
            st.lists(message(protocol.Event), max_size=3),
        )
    if isinstance(tp, type) and issubclass(tp, Message):
        return message(tp)
    if tp is DiskHints:
        hint = st.text(TEXT, max_size=20)
        return st.dictionaries(st.sampled_from(HINT_NAMES), hint, max_size=3).map(DiskHints.of)
    if tp is Inventory:
        return st.just(inventory())
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if tp is str:
        limit = b.max_len if b.max_len is not None else 40
        if b.pattern is not None:
            return st.from_regex(re.compile(b.pattern), fullmatch=True).filter(lambda s: len(s) <= limit)
        return st.text(TEXT, max_size=min(limit, 40))
    if tp is bool:
        return st.booleans()
    if tp is int:
        lo = int(b.lo) if b.lo is not None else -(1 << 63)
        hi = int(b.hi) if b.hi is not None else (1 << 63) - 1
        return st.integers(lo, hi)
    if tp is float:
        return st.floats(b.lo, b.hi, allow_nan=False, allow_infinity=False)
    raise AssertionError(f"no strategy for {tp!r}: teach this test the new wire type")


def message(cls: type[Message]) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{name: strategy(tp, b) for name, tp, b, _ in fields_of(cls)})


# -- the declarations and the published document --------------------------------------------------


def test_every_declared_message_is_published_and_every_route_names_a_schema() -> None:
    assert set(DECLARED) == set(openapi.MESSAGES.values()) - {Inventory}
    for route in routes():
        for name in (route.request, route.response):
            if name:
                assert name in SCHEMAS or name in openapi._MEDIA, (route.path, name)
    for name in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(SCHEMAS[name])


def test_schemas_name_every_field_and_require_exactly_those_without_a_default() -> None:
    for cls in DECLARED:
        schema = SCHEMAS[NAME[cls]]
        declared = fields_of(cls)
        assert list(schema["properties"]) == [name for name, *_ in declared], cls
        assert schema.get("required", []) == [name for name, _, _, req in declared if req], cls
        assert schema["additionalProperties"] is False, cls


def test_disk_hints_take_their_names_from_the_hint_engine() -> None:
    assert sorted(SCHEMAS["JobParams"]["properties"]["disk"]["properties"]) == sorted(HINT_NAMES)
    # the live bug: by_id and tran were refused although the engine offers them
    hints = DiskHints.parse("by_id=wwn-0x5002538e40a1b2c3,tran=sata,size=>= 100")
    assert hints.as_dict() == {"by_id": "wwn-0x5002538e40a1b2c3", "tran": "sata", "size": ">= 100"}
    with pytest.raises(ProtocolError, match=r"field 'disk\.colour': expected one of the fields size,"):
        DiskHints.parse("colour=red")


def _inputs() -> set[str]:
    names = {r.request for r in routes() if r.request} | {"Assignment", "RegisterReply", "HeartbeatReply"}
    return names - {"Inventory"}  # the inventory is bounded by agent.hardware.wire's reader


def _walk(schema: Any, where: str, seen: set[str]) -> list[str]:
    """Places in a schema a client could send without a bound."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if name in seen or name == "Inventory":
            return []
        seen.add(name)
        return _walk(SCHEMAS[name], name, seen)
    if "anyOf" in schema:
        return [p for s in schema["anyOf"] for p in _walk(s, where, seen)]
    kind = schema.get("type")
    if kind == "string" and "enum" not in schema and "maxLength" not in schema:
        return [where]
    if kind == "array":
        return ([] if "maxItems" in schema else [where]) + _walk(schema["items"], f"{where}[]", seen)
    if kind == "object":
        loose = [] if schema.get("additionalProperties") is False else [f"{where}{{}}"]
        return loose + [
            p for k, s in schema.get("properties", {}).items() for p in _walk(s, f"{where}.{k}", seen)
        ]
    if kind in ("integer", "number"):
        return [] if "minimum" in schema and "maximum" in schema else [where]
    return []


def test_every_string_number_and_list_a_client_sends_is_bounded() -> None:
    unbounded = [p for name in sorted(_inputs()) for p in _walk(SCHEMAS[name], name, set())]
    assert unbounded == []


# -- round trips and refusals, codec against schema -------------------------------------------------


@pytest.mark.parametrize("cls", DECLARED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", ["application/json", "application/msgpack"])
def test_every_message_round_trips_and_fits_its_schema(cls: type[Message], kind: str) -> None:
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy(cls))
    def check(msg: Message) -> None:
        wire = msg.to_wire()
        assert valid(NAME[cls], wire), list(validator(NAME[cls]).iter_errors(wire))[:1]
        assert cls.from_wire(decode_body(encode_body(wire, kind), kind)) == msg

    check()


def _mutations(cls: type[Message], wire: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Bodies that break one rule of the declaration each."""
    out = [("an unknown field", {**wire, "zz_unknown": 1})]
    for name, tp, b, required in fields_of(cls):
        if required:
            out.append((f"{name} missing", {k: v for k, v in wire.items() if k != name}))
        out.append((f"{name} of the wrong type", {**wire, name: {"zz": [1]}}))
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        bare = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        if bare is str and b.max_len is not None:
            out.append((f"{name} too long", {**wire, name: "a" * (b.max_len + 1)}))
        if bare is int and b.hi is not None:
            out.append((f"{name} too big", {**wire, name: int(b.hi) + 1}))
        if bare is float and b.lo is not None:
            out.append((f"{name} too small", {**wire, name: float(b.lo) - 1.0}))
        if typing.get_origin(tp) is tuple and b.max_len is not None:
            out.append((f"{name} too many", {**wire, name: [None] * (b.max_len + 1)}))
    return out


@pytest.mark.parametrize("cls", DECLARED, ids=lambda c: c.__name__)
def test_codec_and_schema_refuse_the_same_bodies(cls: type[Message]) -> None:
    @settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy(cls))
    def check(msg: Message) -> None:
        for what, body in _mutations(cls, msg.to_wire()):
            assert not valid(NAME[cls], body), f"the schema of {cls.__name__} accepts {what}"
            with pytest.raises(ProtocolError):
                cls.from_wire(body)

    check()


# -- the served API against the declarations ------------------------------------------------------


async def test_the_served_api_answers_what_its_routes_declare(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    """Drive every JSON route once; each reply must fit the schema its route names."""
    h = await start(aiohttp_client, tmp_path)
    add_image(h.config.store_dir, "tiny", "1")
    served = await (await h.client.get("/v1/openapi.json")).json()
    assert served["components"]["schemas"] == SCHEMAS and set(served["paths"]) == set(DOC["paths"])
    table = {(r.method, r.path): r for r in routes()}
    seen: set[tuple[str, str]] = set()

    async def call(method: str, template: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
        route = table[(method, template)]
        r = await h.client.request(method, path, headers=headers, **kw)
        assert r.status < 300, (path, r.status, await r.text())
        body = await r.json()
        assert valid(route.response or "", body), (
            path,
            list(validator(route.response or "").iter_errors(body))[:1],
        )
        seen.add((method, template))
        return body

    machine_id = await h.enroll("52:54:00:00:00:01")
    token = await h.enrollment_token("52:54:00:00:00:02")
    body = {
        "enrollment_token": token,
        "inventory": inventory(macs=("52:54:00:00:00:02",), uuid="u2").to_wire(),
    }
    other = (await call("POST", "/v1/agent/register", "/v1/agent/register", {}, json=body))["machine_id"]
    op, ag = h.op, h.agent(machine_id)
    await call("GET", "/healthz", "/healthz", {})
    await call("POST", "/v1/images", "/v1/images", op, json={"ref": "tiny:1"})
    await call("GET", "/v1/images", "/v1/images", op)
    m = "/v1/machines/{machine}"
    await call(
        "PATCH",
        m,
        f"/v1/machines/{machine_id}",
        op,
        json={"disk_hints": {"by_id": "x"}, "desired_image": "tiny:1", "kernel_args": "quiet"},
    )
    job = await call(
        "POST", "/v1/jobs", "/v1/jobs", op, json={"machine": machine_id, "kind": "deploy", "image": "tiny"}
    )
    await call("GET", "/v1/agent/jobs/next", "/v1/agent/jobs/next?wait=0", ag)
    await call(
        "POST", "/v1/agent/heartbeat", "/v1/agent/heartbeat", ag, json={"job_id": job["id"], "status": "x"}
    )
    digest = (await call("GET", "/v1/jobs/{job_id}", f"/v1/jobs/{job['id']}", op))["params"][
        "manifest_digest"
    ]
    announce = {"job_id": job["id"], "manifest_digest": digest, "port": 7070, "chunks": 1, "have": "AQ=="}
    peers = await call("POST", "/v1/agent/peers", "/v1/agent/peers", ag, json=announce)
    assert peers["grant"]["ticket"].startswith("t2." + digest) and peers["seed_of"] == 1
    await call(
        "POST",
        "/v1/agent/inventory",
        "/v1/agent/inventory",
        ag,
        json=inventory(macs=("52:54:00:00:00:01",), uuid="4c4c4544-0000-1000-8000-525400000001").to_wire(),
    )
    events = {"attempt": 1, "events": [event(1, "fetch"), event(2, "", 5, 10)]}
    await call(
        "POST", "/v1/agent/jobs/{job_id}/events", f"/v1/agent/jobs/{job['id']}/events", ag, json=events
    )
    finish = {"attempt": 1, "result": {"outcome": "succeeded", "bytes_written": 10}}
    await call(
        "POST", "/v1/agent/jobs/{job_id}/finish", f"/v1/agent/jobs/{job['id']}/finish", ag, json=finish
    )
    await call("GET", "/v1/jobs/{job_id}", f"/v1/jobs/{job['id']}", op)
    await call("GET", "/v1/jobs", "/v1/jobs?limit=5", op)
    await call("GET", "/v1/events", "/v1/events", op)
    await call("GET", m, f"/v1/machines/{machine_id}", op)
    await call("GET", "/v1/machines", "/v1/machines", op)
    queued = await call("POST", "/v1/jobs", "/v1/jobs", op, json={"machine": other, "kind": "inventory"})
    await call("POST", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{queued['id']}/cancel", op)
    await call("DELETE", m, f"/v1/machines/{other}", op)
    await call("POST", f"{m}/expect", "/v1/machines/52:54:00:00:00:09/expect", op)
    moved = await h.enroll("52:54:00:00:00:03", uuid="u3")
    await h.enroll("52:54:00:00:00:03", uuid="u3-other-board")  # a changed fingerprint: quarantined
    held = await call("GET", m, f"/v1/machines/{moved}", op)
    assert held["state"] == "quarantined" and held["quarantine"]["changes"] == [
        "system uuid u3 -> u3-other-board"
    ]
    assert held["events"], "the quarantine is an event of the machine"
    accepted = await call("POST", f"{m}/accept", f"/v1/machines/{moved}/accept", op)
    assert accepted["quarantine"] is None and accepted["fingerprint"]["system_uuid"] == "u3-other-board"
    fake = FakeBmc("ipmi://127.0.0.1:623")
    h.client.app[SERVICES].power.connector = lambda *_: fake
    bmc = {"address": "ipmi://127.0.0.1", "username": "admin", "password": "planted-pw"}
    shown = await call("PUT", f"{m}/bmc", f"/v1/machines/{machine_id}/bmc", op, json=bmc)
    assert "planted-pw" not in json.dumps(shown)
    await call("GET", f"{m}/bmc", f"/v1/machines/{machine_id}/bmc", op)
    on = await call("POST", f"{m}/power", f"/v1/machines/{machine_id}/power", op, json={"action": "on"})
    assert on["power"] == "on" and fake.calls == ["on"]
    await call("DELETE", f"{m}/bmc", f"/v1/machines/{machine_id}/bmc", op)
    r = await h.client.post("/v1/jobs", json={"machine": machine_id, "kind": "dance"}, headers=op)
    assert r.status == 400 and valid("Error", await r.json())
    json_routes = {k for k, r in table.items() if r.response in SCHEMAS}
    assert json_routes - seen == set(), "a route this test does not drive yet: add it above"


def test_a_view_that_drifts_from_its_declaration_is_caught() -> None:
    """The check above can fail: a view with a key its declaration lacks does not fit."""
    wire = views.Deleted("m-0123456789ab").to_wire()
    assert valid("Deleted", wire)
    assert not valid("Deleted", {**wire, "extra": 1})
    assert not valid("Deleted", {})
    assert json.loads(json.dumps(SCHEMAS["Job"]))["properties"]["state"]["enum"] == [
        "queued", "running", "succeeded", "failed", "cancelled",
    ]  # fmt: skip
    assert msgpack.unpackb(msgpack.packb(wire)) == wire


@pytest.mark.parametrize("name", HINT_NAMES)
def test_sledge_deploy_takes_every_hint_the_engine_offers(name: str) -> None:
    args = build_parser().parse_args(["deploy", "52:54:00:00:00:01", "tiny", "--disk", f"{name}=x1"])
    assert args.disk.as_dict() == {name: "x1"}
    job = views.JobCreate(
        args.machine, protocol.JobKind.DEPLOY, args.image, protocol.JobParams(disk=args.disk)
    )
    assert views.JobCreate.from_wire(job.to_wire()).params.disk.as_dict() == {name: "x1"}
