"""agent.protocol: round trips, strict decoding with named fields, the body codec."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import (
    Assignment,
    DiskHints,
    Event,
    EventBatch,
    EventKind,
    FinishRequest,
    Heartbeat,
    HeartbeatReply,
    JobKind,
    JobParams,
    JobResult,
    Outcome,
    ProtocolError,
    RegisterReply,
    RegisterRequest,
    decode_body,
    encode_body,
    identity,
    normalize_mac,
)
from tests.unit.test_controller_kit import inventory

WIRE = inventory().to_wire()

MESSAGES = [
    RegisterRequest("sle_0123456789abcdef_" + "A" * 43, inventory(), "0.1"),
    RegisterReply("m-0123456789ab", "sla_x", 10.0, 30.0),
    Heartbeat("j-0123456789ab", "writing"),
    Heartbeat(),
    HeartbeatReply(("j-0123456789ab",)),
    Assignment(
        "j-0123456789ab",
        JobKind.DEPLOY,
        2,
        7,
        60.0,
        JobParams("tiny", "1", "ab" * 32, DiskHints.of({"serial": "S1", "size": ">= 100"})),
        ("http://c:8470/v1/store/",),
    ),
    EventBatch(1, (Event(1, 1.5, EventKind.STAGE, "fetch"), Event(2, 2.5, EventKind.PROGRESS, "", 10, 100))),
    FinishRequest(3, JobResult(Outcome.FAILED, "no disk matches serial=S1", "", 0, 12)),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("kind", ["application/json", "application/msgpack"])
def test_round_trip_through_both_codecs(message: object, kind: str) -> None:
    wire = message.to_wire()  # type: ignore[attr-defined]
    decoded = decode_body(encode_body(wire, kind), kind)
    assert type(message).from_wire(decoded) == message  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("parse", "wire", "message"),
    [
        (
            Heartbeat.from_wire,
            {"job_id": 5},
            "field 'job_id': expected a string of at most 1024 characters, got 5",
        ),
        (
            Heartbeat.from_wire,
            {"jobid": "x"},
            "field 'jobid': expected one of the fields job_id, status, got 'unknown'",
        ),
        (EventBatch.from_wire, {"attempt": 1}, "field 'events': expected a value (required), got 'nothing'"),
        (
            EventBatch.from_wire,
            {"attempt": True, "events": []},
            "field 'attempt': expected an integer in [1, 2147483648], got True",
        ),
        (
            EventBatch.from_wire,
            {"attempt": 1, "events": [{"seq": 0, "at": 1, "kind": "log"}]},
            "field 'events[0].seq': expected an integer in [1, ",
        ),
        (
            EventBatch.from_wire,
            {"attempt": 1, "events": [{"seq": 1, "at": float("inf"), "kind": "log"}]},
            "field 'events[0].at': expected a number in [0.0, 100000000000.0], got inf",
        ),
        (
            FinishRequest.from_wire,
            {"attempt": 1, "result": {"outcome": "ok"}},
            "field 'result.outcome': expected one of succeeded, failed, got 'ok'",
        ),
        (
            JobParams.from_wire,
            {"manifest_digest": "XYZ"},
            "field 'params.manifest_digest': expected 64 lowercase hex",
        ),
        (
            JobParams.from_wire,
            {"disk": {"colour": "red"}},
            "field 'params.disk.colour': expected one of the fields",
        ),
        (
            RegisterRequest.from_wire,
            {"enrollment_token": "x", "inventory": {"version": 1}},
            "field 'inventory': expected all the keys of Inventory",
        ),
        (
            RegisterRequest.from_wire,
            {"enrollment_token": "x", "inventory": {**WIRE, "system": {**WIRE["system"], "hostname": 5}}},
            "field 'inventory.system.hostname'",
        ),
    ],
)
def test_errors_name_the_field_and_the_expectation(parse: object, wire: object, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(wire)  # type: ignore[operator]
    assert message in str(info.value)


def test_identity_is_the_uuid_and_physical_macs() -> None:
    assert identity(inventory("ABC", ("52:54:00:00:00:02", "52:54:00:00:00:01"))) == (
        "abc",
        ("52:54:00:00:00:02", "52:54:00:00:00:01"),
    )
    with pytest.raises(ProtocolError, match="at least one network interface with a MAC address"):
        identity(inventory(macs=()))


def test_mac_and_disk_hints_parsing() -> None:
    assert normalize_mac("52-54-00-AA-BB-CC") == "52:54:00:aa:bb:cc"
    with pytest.raises(ProtocolError, match="expected a MAC address like"):
        normalize_mac("52:54:00:aa:bb")
    assert DiskHints.parse("serial=S1, size=>= 100").as_dict() == {"serial": "S1", "size": ">= 100"}
    with pytest.raises(ProtocolError, match="KEY=VALUE pairs"):
        DiskHints.parse("serial")


def test_codec_refuses_what_is_not_a_plain_document() -> None:
    with pytest.raises(ProtocolError, match="at most 10 bytes"):
        decode_body(b"{" * 11, "application/json", limit=10)
    with pytest.raises(ProtocolError, match="well-formed msgpack"):
        decode_body(msgpack.packb({1: 2}), "application/msgpack")  # non-string keys
    with pytest.raises(ProtocolError, match="well-formed msgpack"):
        decode_body(msgpack.packb({"a": b"bin"}), "application/msgpack")
    with pytest.raises(ProtocolError, match="well-formed JSON"):
        decode_body(b"\xff", "application/json; charset=utf-8")
    assert decode_body(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}


@given(
    st.recursive(
        st.none() | st.integers() | st.text() | st.floats(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_parsers_only_raise_protocol_errors(obj: object) -> None:
    for parse in (
        RegisterRequest.from_wire,
        Heartbeat.from_wire,
        EventBatch.from_wire,
        FinishRequest.from_wire,
        Assignment.from_wire,
        RegisterReply.from_wire,
    ):
        with contextlib.suppress(ProtocolError):
            parse(obj)
