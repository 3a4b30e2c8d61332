"""Wire messages declared once: a frozen dataclass whose field types carry their bounds.

A message subclasses Message; a field's type says what travels (str, int, float, bool,
a StrEnum, a nested Message, `tuple[X, ...]`, `X | None`) and `Annotated[T, Bound(...)]`
adds what the type alone does not (lengths, ranges, a pattern, None left out). From that
one declaration come `to_wire` (plain JSON/msgpack values), `from_wire` (strict: unknown
fields, wrong types and out-of-range values raise ProtocolError naming the dotted field,
the expectation and the value) and `schema` (the JSON Schema the OpenAPI document shows).

A field with a default may be left out on the wire; one without is required. Types the
layer does not describe itself bring their own codec: a class with `from_wire(obj, where)`,
`to_wire()` and `wire_schema()` (DiskHints), or a plain dataclass read by `Bound(read=...)`
(the inventory, which agent.hardware.wire reads).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from agent.codec import ProtocolError

Decode = Callable[[Any, str], Any]
Encode = Callable[[Any], Any]
Refs = Callable[[type], "str | None"]  # the schema name a class is published under, if any


@dataclass(frozen=True)
class Bound:
    """What a field's type does not say. None: no limit (outputs); inputs bound every string and list."""

    max_len: int | None = None  # characters of a string, items of a list
    item_len: int | None = None  # characters of each string of a list
    lo: int | float | None = None
    hi: int | float | None = None
    pattern: str | None = None  # the whole string must match
    expected: str | None = None  # the pattern in words, for errors
    omit_none: bool = False  # None travels as a missing key, not null
    read: Decode | None = None  # a reader of its own, for a type this layer does not describe
    doc: str = ""


_NO_BOUND = Bound()


class Message:
    """Base of every declared message: the codecs and the schema come from the dataclass fields."""

    WIRE_WHERE: ClassVar[str] = ""  # where its errors point when it is decoded on its own

    def to_wire(self) -> dict[str, Any]:
        return _plan(type(self)).encode(self)

    @classmethod
    def from_wire(cls, obj: object, where: str | None = None) -> Self:
        message: Self = _plan(cls).decode(obj, cls.WIRE_WHERE if where is None else where)
        return message

    def wire_check(self, where: str) -> None:
        """Checks across fields, run after every field was read; raise ProtocolError."""

    @classmethod
    def schema(cls, refs: Refs = lambda _: None) -> dict[str, Any]:
        return _object_schema(cls, refs)


def path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def fields_of(cls: type) -> list[tuple[str, Any, Bound, bool]]:
    """(name, type, bound, required) of each field of a dataclass, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        tp, bound = _split(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, tp, bound, required))
    return out


def _split(tp: Any) -> tuple[Any, Bound]:
    inner = _optional(tp)
    if inner is not None and typing.get_origin(inner) is Annotated:  # `Ref | None`
        bare, bound = _split(inner)
        return bare | None, bound
    if typing.get_origin(tp) is Annotated:
        found = [a for a in tp.__metadata__ if isinstance(a, Bound)]
        return tp.__origin__, found[0] if found else _NO_BOUND
    return tp, _NO_BOUND


def _optional(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported union {tp!r}: only X | None")
        return inner[0]
    return None


def _is_message(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Message)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _custom(tp: Any) -> bool:
    return isinstance(tp, type) and not _is_message(tp) and hasattr(tp, "wire_schema")


# -- decoding ------------------------------------------------------------------------------------------


class _Plan:
    """One message class compiled once: a reader and a writer per field, so decoding is one loop."""

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        declared = fields_of(cls)
        names = [name for name, *_ in declared]
        self.known = frozenset(names)
        self.known_text = ", ".join(names)
        self.checks = cls.wire_check is not Message.wire_check
        if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
            raise TypeError(
                f"{cls.__name__}: a message is built from its fields alone (no __post_init__, no slots)"
            )
        fields: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(cls)  # type: ignore[arg-type]
        self.defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        self.factories = tuple(
            (f.name, f.default_factory) for f in fields if f.default_factory is not dataclasses.MISSING
        )
        self.readers: tuple[tuple[str, bool, Decode], ...] = ()
        self.writers = tuple((name, b.omit_none, _writer(tp)) for name, tp, b, _ in declared)
        _PLANS[cls] = self  # before the readers, which look up the plans of nested messages
        try:
            self.readers = tuple((name, req, _reader(tp, b)) for name, tp, b, req in declared)
        except TypeError:
            del _PLANS[cls]  # a declaration this layer cannot read stays an error on every use
            raise

    def decode(self, obj: object, where: str) -> Any:
        if not isinstance(obj, dict):
            raise ProtocolError(where or "<body>", "an object", obj)
        if not self.known.issuperset(obj):
            key = next(k for k in obj if k not in self.known)
            raise ProtocolError(path(where, str(key)), f"one of the fields {self.known_text}", "unknown")
        values = self.defaults.copy()
        prefix = where + "." if where else ""
        for name, required, read in self.readers:
            if name in obj:
                values[name] = read(obj[name], prefix + name)
            elif required:
                raise ProtocolError(prefix + name, "a value (required)", "nothing")
        for name, factory in self.factories:
            if name not in obj:
                values[name] = factory()
        # The values are checked already: fill the frozen instance directly rather than through
        # the generated __init__ (a third of the time of decoding a small message).
        message = object.__new__(self.cls)
        message.__dict__.update(values)
        if self.checks:
            message.wire_check(where)
        return message

    def encode(self, message: object) -> dict[str, Any]:
        out: dict[str, Any] = {}
        fields = message.__dict__  # messages have no slots; a dict lookup is cheaper than getattr
        for name, omit_none, write in self.writers:
            value = fields[name]
            if value is None:
                if not omit_none:
                    out[name] = None
            else:
                out[name] = value if write is None else write(value)
        return out


_PLANS: dict[type, _Plan] = {}


def _plan(cls: type[Message]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        # a cache of code derived from the class, the same for every caller: not state to reset
        plan = _Plan(cls)
    return plan


def reader(tp: Any, b: Bound = _NO_BOUND) -> Decode:
    """The strict reader of one field type with its bounds: (value, where) -> value."""
    return _reader(tp, b)


def _reader(tp: Any, b: Bound) -> Decode:
    if b.read is not None:
        return b.read
    inner = _optional(tp)
    if inner is not None:
        read = _reader(inner, b)

        def optional(v: Any, w: str) -> Any:
            return None if v is None else read(v, w)

        return optional
    if typing.get_origin(tp) is tuple:
        return _list_reader(typing.get_args(tp)[0], b)
    if _is_message(tp):
        return _plan(tp).decode
    if _custom(tp):
        custom: Decode = tp.from_wire
        return custom
    if _is_enum(tp):
        return _enum_reader(tp)
    if tp is str:
        return _text_reader(b)
    if tp is bool:
        return _bool_reader
    if tp is int:
        return _int_reader(b)
    if tp is float:
        return _number_reader(b)
    raise TypeError(f"unsupported wire type {tp!r}")


def _text_reader(b: Bound) -> Decode:
    limit = b.max_len
    shape = "a string" if limit is None else f"a string of at most {limit} characters"
    pattern = re.compile(b.pattern) if b.pattern is not None else None
    expected = b.expected or (f"a string matching {b.pattern}" if b.pattern else "")

    def read(v: Any, w: str) -> str:
        if not isinstance(v, str) or (limit is not None and len(v) > limit):
            raise ProtocolError(w, shape, v)
        if pattern is not None and not pattern.fullmatch(v):
            raise ProtocolError(w, expected, v)
        return v

    return read


def _bool_reader(v: Any, w: str) -> bool:
    if type(v) is not bool:
        raise ProtocolError(w, "true or false", v)
    return v


def _int_reader(b: Bound) -> Decode:
    lo = int(b.lo) if b.lo is not None else -(1 << 63)
    hi = int(b.hi) if b.hi is not None else (1 << 63) - 1
    expected = f"an integer in [{lo}, {hi}]"

    def read(v: Any, w: str) -> int:
        if type(v) is not int or not lo <= v <= hi:  # bool is an int in Python, never on the wire
            raise ProtocolError(w, expected, v)
        return v

    return read


def _number_reader(b: Bound) -> Decode:
    lo = float(b.lo) if b.lo is not None else -math.inf
    hi = float(b.hi) if b.hi is not None else math.inf
    expected = f"a number in [{lo}, {hi}]" if b.lo is not None or b.hi is not None else "a finite number"

    def read(v: Any, w: str) -> float:
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
            raise ProtocolError(w, expected, v)
        return float(v)

    return read


def _enum_reader(tp: type[enum.Enum]) -> Decode:
    members = {m.value: m for m in tp}
    expected = f"one of {', '.join(str(v) for v in members)}"

    def read(v: Any, w: str) -> enum.Enum:
        try:
            return members[v]
        except (KeyError, TypeError):  # TypeError: a list or an object is not hashable
            raise ProtocolError(w, expected, v) from None

    return read


def _list_reader(item_tp: Any, b: Bound) -> Decode:
    item = _reader(item_tp, Bound(max_len=b.item_len))
    limit = b.max_len
    shape = "a list" if limit is None else f"a list of at most {limit} items"

    def read(v: Any, w: str) -> tuple[Any, ...]:
        if not isinstance(v, list) or (limit is not None and len(v) > limit):
            raise ProtocolError(w, shape, v)
        return tuple(item(x, f"{w}[{i}]") for i, x in enumerate(v))

    return read


# -- encoding ------------------------------------------------------------------------------------------


def _writer(tp: Any) -> Encode | None:
    inner = _optional(tp)
    if inner is not None:
        return _writer(inner)  # None is handled by the caller
    if typing.get_origin(tp) is tuple:
        item = _writer(typing.get_args(tp)[0])
        if item is None:
            return list
        return lambda v: [item(x) for x in v]
    if _is_enum(tp):
        return operator.attrgetter("value")
    if _is_message(tp):
        return _plan(tp).encode
    if _custom(tp) or hasattr(tp, "to_wire"):
        return lambda v: v.to_wire()
    if dataclasses.is_dataclass(tp):
        raise TypeError(f"{tp!r}: a dataclass on the wire needs to_wire(), or to be a Message")
    return None


# -- JSON Schema ---------------------------------------------------------------------------------------


def _object_schema(cls: type, refs: Refs) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for name, tp, bound, needed in fields_of(cls):
        props[name] = schema_of(tp, bound, refs)
        if needed:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def schema_of(tp: Any, b: Bound = _NO_BOUND, refs: Refs = lambda _: None) -> dict[str, Any]:
    """The JSON Schema of one field type with its bounds."""
    schema = _schema(tp, b, refs)
    return {**schema, "description": b.doc} if b.doc else schema


def _schema(tp: Any, b: Bound, refs: Refs) -> dict[str, Any]:
    inner = _optional(tp)
    if inner is not None:
        return {"anyOf": [schema_of(inner, b, refs), {"type": "null"}]}
    if typing.get_origin(tp) is tuple:
        array: dict[str, Any] = {
            "type": "array",
            "items": schema_of(typing.get_args(tp)[0], Bound(max_len=b.item_len), refs),
        }
        if b.max_len is not None:
            array["maxItems"] = b.max_len
        return array
    if isinstance(tp, type) and (name := refs(tp)) is not None:
        return {"$ref": f"#/components/schemas/{name}"}
    if _custom(tp):
        custom: dict[str, Any] = tp.wire_schema()
        return custom
    if _is_message(tp) or dataclasses.is_dataclass(tp):
        return _object_schema(tp, refs)
    if _is_enum(tp):
        return {"type": "string", "enum": [m.value for m in tp]}
    if tp is str:
        text: dict[str, Any] = {"type": "string"}
        if b.max_len is not None:
            text["maxLength"] = b.max_len
        if b.pattern is not None:
            text["pattern"] = f"^(?:{b.pattern})$"
        return text
    if tp is bool:
        return {"type": "boolean"}
    if tp in (int, float):
        number: dict[str, Any] = {"type": "integer" if tp is int else "number"}
        if b.lo is not None:
            number["minimum"] = b.lo
        if b.hi is not None:
            number["maximum"] = b.hi
        return number
    raise TypeError(f"unsupported wire type {tp!r}")
