"""A strict, generic codec between frozen dataclasses and JSON-able dicts.

Only the field types the inventory uses are supported: str, int, bool, float,
`X | None`, `tuple[X, ...]` and nested dataclasses. Decoding refuses unknown or
missing keys and wrong types, naming the path of the offending value, so a
saved inventory that does not match this code is an error, not a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

from agent.errors import FieldError
from agent.hardware.errors import HardwareError

T = TypeVar("T")


class WireError(FieldError, HardwareError):
    """An inventory value that does not fit its field; names where, what was expected and what came."""

    label = "{field}"

    @property
    def where(self) -> str:
        return self.field


def to_wire(obj: object) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_wire(v) for v in obj]
    return obj


def from_wire(cls: type[T], data: object, where: str = "$") -> T:
    value: T = _decode(cls, data, where)
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolving annotations is costly (a third of the controller's time under load
    # went here): once per class, then from the cache.
    return typing.get_type_hints(cls)


def _decode(tp: Any, data: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        return _decode(inner[0], data, where)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(data, list | tuple):
            raise WireError(where, "a list", data)
        return tuple(_decode(item_tp, v, f"{where}[{i}]") for i, v in enumerate(data))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise WireError(where, f"an object ({tp.__name__})", data)
        fields = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - fields)
        missing = sorted(fields - set(data))
        if unknown:
            raise WireError(where, f"only the keys of {tp.__name__}", f"unknown keys {unknown}")
        if missing:
            raise WireError(where, f"all the keys of {tp.__name__}", f"missing keys {missing}")
        hints = _hints(tp)
        return tp(**{name: _decode(hints[name], data[name], f"{where}.{name}") for name in fields})
    if tp is bool:
        if not isinstance(data, bool):
            raise WireError(where, "a boolean", data)
        return data
    if tp is int:
        # bool is an int in Python, never on our wire
        if not isinstance(data, int) or isinstance(data, bool):
            raise WireError(where, "an integer", data)
        return data
    if tp is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise WireError(where, "a number", data)
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise WireError(where, "a string", data)
        return data
    raise TypeError(f"unsupported wire type {tp!r} at {where}")
