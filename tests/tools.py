"""Host tools some tests need: a developer without them sees the test skipped with the
package to install; under CI=true a missing tool fails the test (CI must not skip coverage)."""

from __future__ import annotations

import os
import shutil

import pytest


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        message = f"needs {', '.join(missing)} (scripts/setup installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
