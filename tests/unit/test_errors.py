"""One error root per package, one field error: an edge can catch a package's errors in one class."""

from __future__ import annotations

import pytest

from agent.codec import ProtocolError
from agent.disk.errors import DiskError, NoSpace, SeedError, TableError
from agent.errors import FieldError, SledgeError
from agent.hardware.errors import HardwareError
from agent.hardware.hints import HintError, NoMatchingDisk, SelectionError
from agent.hardware.wire import WireError
from agent.image.chunk import ChunkInvalid
from agent.image.errors import ImageError
from agent.image.layout import LayoutError
from agent.image.manifest import ManifestError
from agent.image.store import NotInStore, StoreError
from agent.runtime.config import ConfigError
from agent.runtime.errors import AgentError
from agent.runtime.transport import TransportError, Unauthorized
from agent.writer.errors import BadManifest, Cancelled, FetchError, TargetError, WriteError
from controller.auth import AuthError
from controller.cli.operator import CliError
from controller.errors import ControllerError
from controller.fleet.errors import Conflict, Denied, FleetError, Invalid, NotFound
from controller.images.errors import ImageToolError
from controller.images.export import ExportError
from controller.images.nbd import NbdError
from controller.images.sources import SourceError
from controller.jobs import TransitionError
from controller.state.sqlite import StateError

TREE: dict[type[Exception], tuple[type[Exception], ...]] = {
    FieldError: (ProtocolError, WireError, HintError, ManifestError),
    ImageError: (ManifestError, ChunkInvalid, LayoutError, StoreError, NotInStore),
    WriteError: (TargetError, BadManifest, Cancelled, FetchError),
    HardwareError: (HintError, WireError, SelectionError, NoMatchingDisk),
    AgentError: (TransportError, Unauthorized, ConfigError),
    DiskError: (SeedError, TableError, NoSpace),
    ControllerError: (
        FleetError,
        NotFound,
        Conflict,
        Invalid,
        Denied,
        StateError,
        TransitionError,
        AuthError,
        ImageToolError,
        SourceError,
        NbdError,
        ExportError,
        CliError,
    ),
    ImageToolError: (SourceError, NbdError, ExportError),
}


@pytest.mark.parametrize("root", list(TREE), ids=lambda r: r.__name__)
def test_every_error_derives_from_its_package_root_and_from_sledge_error(root: type[Exception]) -> None:
    assert issubclass(root, SledgeError)
    for kind in TREE[root]:
        assert issubclass(kind, root), f"{kind.__name__} is not a {root.__name__}"


def test_roots_are_distinct_packages() -> None:
    roots = [ImageError, WriteError, HardwareError, AgentError, DiskError, ControllerError]
    for a in roots:
        for b in roots:
            assert a is b or not issubclass(a, b)


def test_image_tool_errors_are_os_errors_with_errno() -> None:
    exc = SourceError(2, "cannot open image source /x: No such file or directory")
    assert isinstance(exc, OSError) and exc.errno == 2


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (ProtocolError, "field 'params.disk': expected an object, got 5"),
        (ManifestError, "manifest field 'params.disk': expected an object, got 5"),
        (HintError, "root device hint 'params.disk': expected an object, got 5"),
        (WireError, "params.disk: expected an object, got 5"),
    ],
)
def test_field_errors_name_the_field_the_expectation_and_the_value(
    kind: type[FieldError], message: str
) -> None:
    exc = kind("params.disk", "an object", 5)
    assert str(exc) == message
    assert (exc.field, exc.expected, exc.actual) == ("params.disk", "an object", 5)
    assert isinstance(exc, ValueError)


def test_a_field_error_never_echoes_hostile_input_whole() -> None:
    exc = FieldError("token", "a string of at most 200 characters", "A" * 10_000)
    assert len(str(exc)) < 200 and str(exc).endswith("...")
    assert exc.actual == "A" * 10_000  # the value itself stays available to the code
