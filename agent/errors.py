"""The root of the errors sledge raises on purpose, and the one "field, expected, got" error.

Every package has one root below SledgeError, so an edge (a CLI, a job, an HTTP handler) catches
one class per package, or SledgeError for all of them; OS errors are wrapped once, where they
happen, with the path or URL.

SledgeError
├── FieldError (ValueError)   a value that does not fit its field: names it, the expectation, the value
│   ├── ProtocolError         agent.codec: an agent <-> controller or operator API message
│   ├── WireError             agent.hardware.wire: an inventory
│   ├── HintError             agent.hardware.hints: a root device hint
│   └── ManifestError         agent.image.manifest (also an ImageError)
├── ImageError                agent.image: ManifestError, ChunkInvalid, LayoutError, StoreError
├── WriteError                agent.writer: TargetError, ManifestUnavailable, ChunkUnavailable,
│                             VerifyFailed, Cancelled, FetchError (one failed attempt at one source)
├── HardwareError             agent.hardware: HintError, WireError, SelectionError
├── DiskError                 agent.disk: SeedError (TableError, NoSpace, SeedTooLarge),
│                             EfiBootError (EfiVarsError: efivarfs, agent.runtime.efivars)
├── AgentError                agent.runtime: TransportError, ConfigError
└── ControllerError           controller (controller/errors.py draws its part of the tree)
"""

from __future__ import annotations

_SHOWN = 80


def shown(value: object) -> str:
    """repr(value), cut to 80 characters: hostile input is named, never echoed whole."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


class SledgeError(Exception):
    """Any error sledge raises on purpose."""


class FieldError(SledgeError, ValueError):
    """A value that does not fit its field.

    `field` is the dotted path of the value, `expected` says what fits, `actual` is the value
    as it came; subclasses say what kind of field it is in `label`.
    """

    label = "field {field!r}"

    def __init__(self, field_name: str, expected: str, actual: object) -> None:
        self.field = field_name
        self.expected = expected
        self.actual = actual
        where = self.label.format(field=field_name)
        super().__init__(f"{where}: expected {expected}, got {shown(actual)}")
