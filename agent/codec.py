"""The wire codec shared by the agent protocol: JSON or msgpack bodies.

`decode_body` parses a body by its Content-Type, refusing duplicate keys, NaN and
oversized input. The messages themselves are declared and read in agent.wire.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgpack

from agent.errors import FieldError

JSON = "application/json"
MSGPACK = "application/msgpack"
MAX_BODY = 1 << 20
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class ProtocolError(FieldError):
    """A message that does not match the protocol; names the field, the expectation and the value."""


def normalize_mac(value: str, where: str = "mac") -> str:
    """aa:bb:cc:dd:ee:ff, lowercase; '-' separators accepted."""
    mac = value.strip().lower().replace("-", ":") if isinstance(value, str) else value
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise ProtocolError(where, "a MAC address like 52:54:00:12:34:56", value)
    return mac


# -- codec ---------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(key, "each key once", "a duplicate key")
        out[key] = value
    return out


def _no_constant(name: str) -> float:
    raise ProtocolError("<body>", "finite numbers only", name)


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def decode_body(data: bytes, content_type: str, limit: int = MAX_BODY) -> object:
    """Parse a request/response body as JSON or msgpack; ProtocolError if malformed."""
    if len(data) > limit:
        raise ProtocolError("<body>", f"at most {limit} bytes", f"{len(data)} bytes")
    kind = media_type(content_type)
    if kind in (MSGPACK, "application/x-msgpack"):
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_bin_len=0)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError("<body>", "well-formed msgpack", str(exc)) from None
    if kind in (JSON, ""):
        try:
            return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError("<body>", "well-formed JSON", str(exc)) from None
    raise ProtocolError("<content-type>", f"{JSON} or {MSGPACK}", content_type)


def encode_body(obj: object, content_type: str = JSON) -> bytes:
    if media_type(content_type) in (MSGPACK, "application/x-msgpack"):
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
