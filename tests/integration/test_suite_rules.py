"""The suite's own rules, run for real: under CI nothing that should run is skipped. A non-root
run under CI stops with a non-zero status before any test; without CI it skips root tests with
the reason; a missing host tool skips locally and fails under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import need, under_ci

REPO = Path(__file__).resolve().parents[2]
ROOT_TESTS = "tests/integration/test_erase.py"  # a file of root-marked tests (loop devices)


def pytest_as_nobody(*args: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    """Run pytest as uid 65534: in a user namespace when we are root, as ourselves otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    if os.geteuid() == 0:
        need("unshare")
        cmd = ["unshare", "--user", "--map-user=65534", "--map-group=65534", *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_ci_as_non_root_stops_before_any_test() -> None:
    run = pytest_as_nobody(ROOT_TESTS, ci="true")
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "CI must run as root" in out and f"uid {65534 if os.geteuid() == 0 else os.geteuid()}" in out
    assert " passed" not in out and " skipped" not in out and " xfail" not in out


def test_without_ci_root_tests_are_skipped_with_the_reason() -> None:
    run = pytest_as_nobody(ROOT_TESTS, "-rs", ci="false")
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.OK, out
    assert "needs root for loop devices" in out and " skipped" in out and " passed" not in out


def test_ci_may_deselect_root_tests_on_purpose() -> None:
    run = pytest_as_nobody(ROOT_TESTS, "-m", "not root", ci="true")
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert "deselected" in out and "CI must run as root" not in out


@pytest.mark.parametrize(
    ("value", "ci"), [("true", True), ("1", True), ("yes", True), ("", False), ("false", False), ("0", False)]
)
def test_what_counts_as_ci(monkeypatch: pytest.MonkeyPatch, value: str, ci: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert under_ci() is ci


def test_a_missing_tool_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = "sledge-test-no-such-tool"
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match=f"needs {absent} on PATH"):
        need("sh", absent)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"needs {absent} on PATH"):
        need("sh", absent)
    need("sh")  # present: neither
