"""Root device hints: which disk to write, chosen exactly as OpenStack Ironic means them.

Pure: a hints mapping (as an operator writes it) and the inventory's disks in, one
disk or an error out. docs/root-device-hints.md is the reference; in short:

- names, types and operators are Ironic's (ironic-python-agent device_hints and
  oslo.utils specs_matcher): a bare value means `==` for size and `s==` for
  strings; `=` means `>=` (specs_matcher's legacy rule); strings are stripped,
  lowercased and URL-quoted before comparing; size is GiB compared against the
  exact byte count; rotational takes a boolean or one of strutils' strings.
- past Ironic: a `by_id` hint, every by-path/by-id link of a disk is considered,
  `name` with or without /dev/, several matches are refused as ambiguous, and with
  no hints only a fixed, internal, writable disk of at least 4 GiB is chosen.
- never a disk that holds the running system, is mounted, has holders (busy),
  is a ROM device, read-only or empty, whatever the hints say.

Every hint is checked before any disk is looked at (parse_hints), so a typo is a
HintError naming the hint, not "no disk found".
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from urllib.parse import quote

from agent.errors import FieldError
from agent.hardware.errors import HardwareError
from agent.hardware.model import Disk

GiB = 1 << 30
MIN_DEFAULT_SIZE = 4 * GiB  # Ironic's default minimum for an install disk

STRING_HINTS = (
    "name", "model", "vendor", "serial", "wwn", "wwn_with_extension", "wwn_vendor_extension",
    "hctl", "by_path", "tran", "by_id",
)  # fmt: skip
HINT_NAMES = ("size", "rotational", *STRING_HINTS)

# The order in which specs_matcher's grammar tries operators (as prefixes, no space needed).
_OPERATORS = (
    "<or>", "<all-in>", "<range-in>",
    "==", "=", "!=", "<in>", ">=", "<=", ">", "<", "s==", "s!=", "s<=", "s<", "s>=", "s>",
)  # fmt: skip
_NUMERIC: dict[str, Callable[[Fraction, Fraction], bool]] = {
    "==": operator.eq, "!=": operator.ne, ">=": operator.ge, ">": operator.gt,
    "<=": operator.le, "<": operator.lt,
    "=": operator.ge,  # specs_matcher: '=' is ">=", kept for Nova's legacy filters
}  # fmt: skip
_ORDERING: dict[str, Callable[[str, str], bool]] = {
    "s<": operator.lt, "s<=": operator.le, "s>": operator.gt, "s>=": operator.ge,
}  # fmt: skip
# strutils.bool_from_string(strict=True), which Ironic uses for rotational
_TRUE = ("1", "t", "true", "on", "y", "yes")
_FALSE = ("0", "f", "false", "off", "n", "no")
# where a relative value of these hints lives
_PREFIX = {"name": "/dev/", "by_path": "/dev/disk/by-path/", "by_id": "/dev/disk/by-id/"}


class HintError(FieldError, HardwareError):
    """An invalid hint; names the hint, what was expected and what was given."""

    label = "root device hint {field!r}"

    @property
    def hint(self) -> str:
        return self.field


@dataclass(frozen=True)
class SizeHint:
    name: str
    op: str  # a key of _NUMERIC, "<or>" or "<range-in>"
    values: tuple[Fraction, ...]  # GiB; for <range-in>: (low, high)
    bounds: str = ""  # for <range-in>: the brackets, e.g. "[)"

    def matches(self, disk: Disk) -> bool:
        gib = Fraction(disk.size, GiB)  # exact: no rounding of the disk's bytes
        if self.op == "<or>":
            return gib in self.values
        if self.op == "<range-in>":
            low, high = self.values
            above = gib >= low if self.bounds[0] == "[" else gib > low
            below = gib <= high if self.bounds[1] == "]" else gib < high
            return above and below
        return _NUMERIC[self.op](gib, self.values[0])


@dataclass(frozen=True)
class StringHint:
    name: str
    op: str  # s==, s!=, s<, s<=, s>, s>=, <in>, <or>
    values: tuple[str, ...]  # normalized: stripped, lowercased, prefixed where relative

    def matches(self, disk: Disk) -> bool:
        have = [_norm(v) for v in _disk_values(disk, self.name)]
        if not have:
            return False  # an unknown value matches nothing, not even s!= (it may be the one)
        if self.op == "s==":
            return self.values[0] in have
        if self.op == "s!=":
            return self.values[0] not in have
        if self.op == "<or>":
            return any(v in self.values for v in have)
        if self.op == "<in>":
            return any(self.values[0] in v for v in have)
        # Ironic compares the URL-quoted forms; for ordering that can differ from plain text
        bound = _quoted(self.values[0])
        return any(_ORDERING[self.op](_quoted(v), bound) for v in have)


@dataclass(frozen=True)
class BoolHint:
    name: str
    value: bool
    op: str = "=="

    def matches(self, disk: Disk) -> bool:
        return disk.rotational == self.value


Hint = SizeHint | StringHint | BoolHint


def _quoted(value: str) -> str:
    return quote(value, errors="surrogatepass")


def _norm(value: str) -> str:
    return value.strip().lower()


def _disk_values(disk: Disk, name: str) -> list[str]:
    if name == "name":
        return [disk.path]
    if name in ("by_path", "by_id"):
        links: tuple[str, ...] = getattr(disk, name)
        return list(links)
    value = getattr(disk, name)
    return [value] if isinstance(value, str) and value.strip() else []


def parse_hints(raw: object) -> tuple[Hint, ...]:
    """Validate every hint; raises HintError naming the first bad one."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise HintError("(hints)", "an object mapping hint names to values", raw)
    hints: list[Hint] = []
    for name, expression in raw.items():
        if name not in HINT_NAMES:
            raise HintError(str(name), f"a hint name, one of {', '.join(HINT_NAMES)}", name)
        if name == "rotational":
            hints.append(BoolHint(name, _parse_bool(name, expression)))
        elif name == "size":
            hints.append(_parse_size(name, expression))
        else:
            hints.append(_parse_string(name, expression))
    return tuple(hints)


def _split(name: str, expression: str) -> tuple[str | None, str]:
    text = expression.strip().lower()
    if not text:
        raise HintError(name, "a non-empty expression", expression)
    for op in _OPERATORS:
        if text.startswith(op):
            operand = text[len(op) :].strip()
            if not operand:
                raise HintError(name, f"a value after {op!r}", expression)
            return op, operand
    return None, text


def _alternatives(name: str, operand: str, expression: str) -> list[str]:
    values = [v.strip() for v in operand.split("<or>")]
    while values and not values[-1]:
        values.pop()  # a trailing `<or>`: Ironic's own tests write "<or> a <or> b <or>"
    if not values or any(not v for v in values):
        # Ironic would silently ignore every alternative after an empty one
        raise HintError(name, "'<or> a <or> b ...' with no empty alternative between two others", expression)
    return values


def _parse_bool(name: str, expression: object) -> bool:
    if isinstance(expression, bool):
        return expression
    text = str(expression).strip().lower() if isinstance(expression, str | int) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise HintError(name, f"a boolean, or one of {', '.join(_TRUE + _FALSE)}", expression)


_DECIMAL = re.compile(r"^\d+(\.\d+)?$")
_RANGE = re.compile(r"^([\[(])\s*(\S+?)\s+(\S+?)\s*([\])])$")


def _parse_size(name: str, expression: object) -> SizeHint:
    if isinstance(expression, bool) or not isinstance(expression, int | str):
        raise HintError(name, "an integer number of GiB or a string like '>= 100'", expression)
    text = str(expression)
    op, operand = _split(name, text)
    op = op or "=="
    if op == "<range-in>":
        m = _RANGE.match(operand)
        if m is None or not _DECIMAL.match(m.group(2)) or not _DECIMAL.match(m.group(3)):
            raise HintError(name, "'<range-in> [ low high ]' in GiB, ( or ) for open ends", expression)
        low, high = Fraction(m.group(2)), Fraction(m.group(3))
        if low > high:
            raise HintError(name, "a range whose low end is not above its high end", expression)
        return SizeHint(name, op, (low, high), m.group(1) + m.group(4))
    if op != "<or>" and op not in _NUMERIC:
        raise HintError(name, f"a numeric operator ({', '.join(_NUMERIC)}, <or>, <range-in>)", expression)
    values = _alternatives(name, operand, text) if op == "<or>" else [operand]
    for v in values:
        # Ironic: int(value) must work and be positive
        if not re.fullmatch(r"[+-]?\d+", v) or int(v) <= 0:
            raise HintError(name, "a positive integer number of GiB", expression)
    return SizeHint(name, op, tuple(Fraction(int(v)) for v in values))


def _parse_string(name: str, expression: object) -> StringHint:
    if not isinstance(expression, str):
        raise HintError(name, "a string", expression)
    try:
        expression.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from JSON "\ud800"
        raise HintError(name, "valid Unicode text", expression) from None
    op, operand = _split(name, expression)
    op = op or "s=="
    if op in _NUMERIC:
        raise HintError(
            name, f"a string operator (s==, s!=, s<, s<=, s>, s>=, <in>, <or>), not {op!r}", expression
        )
    if op not in ("s==", "s!=", "<in>", "<or>", *_ORDERING):
        raise HintError(name, f"an operator that applies to a string, not {op!r}", expression)
    values = _alternatives(name, operand, expression) if op == "<or>" else [operand]
    prefix = _PREFIX.get(name)
    if prefix is not None and op != "<in>":
        values = [v if v.startswith("/") else prefix + v for v in values]
    return StringHint(name, op, tuple(values))


def describe(hint: Hint) -> str:
    if isinstance(hint, BoolHint):
        return f"{hint.name} {str(hint.value).lower()}"
    if isinstance(hint, SizeHint):
        if hint.op == "<range-in>":
            low, high = hint.values
            return f"size <range-in> {hint.bounds[0]} {low} {high} {hint.bounds[1]} GiB"
        return f"size {hint.op} {' <or> '.join(str(v) for v in hint.values)} GiB"
    return f"{hint.name} {hint.op} {' <or> '.join(repr(v) for v in hint.values)}"


# -- choosing one disk ---------------------------------------------------------------------------


class SelectionError(HardwareError):
    """No disk, or more than one, fits; lists every disk seen and why it was not taken."""

    def __init__(self, message: str, candidates: Sequence[Candidate]) -> None:
        self.candidates = tuple(candidates)
        lines = [message] + [f"  {c.line()}" for c in self.candidates]
        super().__init__("\n".join(lines))


class NoMatchingDisk(SelectionError):
    pass


class AmbiguousDisks(SelectionError):
    pass


@dataclass(frozen=True)
class Candidate:
    """A disk and the verdict on it: the reason it cannot be used, or the hint it fails."""

    disk: Disk
    refused: str | None = None
    mismatch: str | None = None

    def line(self) -> str:
        d = self.disk
        fields = [d.path, f"{d.size} bytes ({d.size / GiB:.1f} GiB)"]
        for key in ("model", "serial", "wwn", "hctl", "tran"):
            value = getattr(d, key)
            if value:
                fields.append(f"{key}={value}")
        if d.by_path:
            fields.append(f"by_path={d.by_path[0]}")
        if d.by_id:
            fields.append(f"by_id={d.by_id[0]}")
        verdict = self.refused or self.mismatch
        return "  ".join(fields) + (f"  -- {verdict}" if verdict else "")


def refusal(disk: Disk) -> str | None:
    """Why this disk can never be written, hints or not; None when it can."""
    if disk.holds_root:
        return "refused: holds the running system (/)"
    if disk.mounts:
        return f"refused: mounted ({', '.join(disk.mounts)})"
    busy = disk.holders + tuple(h for p in disk.partitions for h in p.holders)
    if busy:
        return f"refused: in use by {', '.join(busy)}"
    if disk.kind == "rom" or disk.name.startswith("sr"):
        # Ironic never lists them (lsblk TYPE rom); a writable DVD-RAM is still not a root disk
        return "refused: a rom device (CD/DVD drive)"
    if disk.read_only:
        return "refused: read-only"
    if disk.size == 0:
        return "refused: empty (no medium or not attached)"
    return None


def default_exclusion(disk: Disk) -> str | None:
    """Why a disk is not picked when there are no hints (a hint can still name it)."""
    if disk.kind in ("loop", "ram", "zram"):
        return f"not a default choice: {disk.kind} device"
    if disk.removable:
        return "not a default choice: removable"
    if disk.tran == "usb":
        return "not a default choice: USB"
    if disk.tran == "mmc" or disk.name.startswith("mmcblk"):
        return "not a default choice: SD/MMC"
    if disk.size < MIN_DEFAULT_SIZE:
        return f"not a default choice: smaller than {MIN_DEFAULT_SIZE // GiB} GiB"
    return None


def first_mismatch(hints: Sequence[Hint], disk: Disk) -> str | None:
    for hint in hints:
        if not hint.matches(disk):
            return f"does not match {describe(hint)}"
    return None


def select_disk(disks: Sequence[Disk], raw_hints: object = None) -> Disk:
    """The one disk the hints designate; raises HintError, NoMatchingDisk or AmbiguousDisks."""
    hints = parse_hints(raw_hints)  # before looking at any disk
    if not hints:
        return _select_default(disks)
    verdicts = [Candidate(d, refusal(d), first_mismatch(hints, d)) for d in disks]
    usable = [c for c in verdicts if c.refused is None and c.mismatch is None]
    shown = ", ".join(describe(h) for h in hints)
    if len(usable) == 1:
        return usable[0].disk
    if not usable:
        raise NoMatchingDisk(f"no usable disk matches the root device hints ({shown}); disks seen:", verdicts)
    raise AmbiguousDisks(
        f"{len(usable)} disks match the root device hints ({shown}); add a hint that tells them apart"
        " (serial, wwn or by_path):",
        usable,
    )


def _select_default(disks: Sequence[Disk]) -> Disk:
    verdicts = [Candidate(d, refusal(d) or default_exclusion(d)) for d in disks]
    usable = sorted((c for c in verdicts if c.refused is None), key=lambda c: c.disk.size)
    if not usable:
        raise NoMatchingDisk(
            "no root device hints given and no disk qualifies by default (internal, fixed, writable,"
            f" unused, at least {MIN_DEFAULT_SIZE // GiB} GiB); disks seen:",
            verdicts,
        )
    smallest = [c for c in usable if c.disk.size == usable[0].disk.size]
    if len(smallest) > 1:
        # same size: nothing stable tells them apart, and sda/sdb may swap between boots
        raise AmbiguousDisks(
            f"no root device hints given and {len(smallest)} disks tie as the smallest qualifying disk;"
            " give a hint (serial, wwn or by_path):",
            smallest,
        )
    return smallest[0].disk
