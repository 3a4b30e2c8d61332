"""The wire codec shared by the agent protocol: JSON or msgpack bodies, strict readers.

`decode_body` parses a body by its Content-Type, refusing duplicate keys, NaN and
oversized input; `Fields` reads one object with known keys only and typed getters,
raising ProtocolError that names the dotted field, the expectation and the value.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

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


# -- strict readers --------------------------------------------------------------------------------

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")
_MISSING: Any = object()


class Fields:
    """Reads one wire object: known keys only, typed getters, errors with the dotted path."""

    def __init__(self, obj: object, where: str, known: tuple[str, ...]) -> None:
        self.where = where
        if not isinstance(obj, dict):
            raise ProtocolError(where or "<body>", "an object", obj)
        for key in obj:
            if key not in known:
                raise ProtocolError(self.path(str(key)), f"one of the fields {', '.join(known)}", "unknown")
        self.obj: dict[str, Any] = obj

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any) -> Any:
        if key in self.obj:
            return self.obj[key]
        if default is _MISSING:
            raise ProtocolError(self.path(key), "a value (required)", "nothing")
        return default

    def text(
        self, key: str, default: Any = _MISSING, max_len: int = 1024, pattern: re.Pattern[str] | None = None
    ) -> Any:
        value = self._get(key, default)
        if value is default and key not in self.obj:
            return value
        if not isinstance(value, str) or len(value) > max_len:
            raise ProtocolError(self.path(key), f"a string of at most {max_len} characters", value)
        if pattern is not None and not pattern.fullmatch(value):
            raise ProtocolError(self.path(key), f"a string matching {pattern.pattern}", value)
        return value

    def integer(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and key not in self.obj:
            return value
        if type(value) is not int or not lo <= value <= hi:
            raise ProtocolError(self.path(key), f"an integer in [{lo}, {hi}]", value)
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and key not in self.obj:
            return value
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
            raise ProtocolError(self.path(key), f"a number in [{lo}, {hi}]", value)
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if type(value) is not bool:
            raise ProtocolError(self.path(key), "true or false", value)
        return value

    def choice(self, key: str, kind: type[E], default: Any = _MISSING) -> E:
        value = self._get(key, default)
        if isinstance(value, kind):
            return value
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in kind)
            raise ProtocolError(self.path(key), f"one of {choices}", value) from None

    def items(
        self, key: str, max_len: int, read: Callable[[object, str], T], default: Any = _MISSING
    ) -> tuple[T, ...]:
        value = self._get(key, default)
        if value is default and key not in self.obj:
            return tuple(value)
        if not isinstance(value, list) or len(value) > max_len:
            raise ProtocolError(self.path(key), f"a list of at most {max_len} items", value)
        return tuple(read(item, f"{self.path(key)}[{i}]") for i, item in enumerate(value))


def _str_item(obj: object, where: str) -> str:
    if not isinstance(obj, str) or len(obj) > 2048:
        raise ProtocolError(where, "a string of at most 2048 characters", obj)
    return obj
