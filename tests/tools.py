"""What a test needs from the host, and what happens when it is missing: a developer sees the
test skipped with the reason; under CI (env CI set and not "false"/"0"/"no"/"") the same test
FAILS, because CI is the place that must run everything and a skip there hides lost coverage."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip the current test (fail it under CI), saying what is missing and how to get it."""
    if under_ci():
        pytest.fail(f"{reason} (under CI=true a missing requirement fails, it does not skip)")
    pytest.skip(reason)


def need(*tools: str) -> None:
    """Host programs the test runs; scripts/setup installs the Debian packages holding them."""
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        unavailable(f"needs {', '.join(absent)} on PATH (scripts/setup installs them)")
