"""agent.runtime.machine.settle_udev: the inventory waits for udev's coldplug when udevd runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.runtime.machine import settle_udev


def fake_udevadm(bin_dir: Path, status: int) -> Path:
    """A udevadm on PATH that records its arguments and exits with `status`."""
    calls = bin_dir / "calls"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "udevadm"
    script.write_text(f'#!/bin/sh\necho "$@" >>{calls}\nexit {status}\n')
    script.chmod(0o755)
    return calls


def test_it_settles_when_udevd_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_udevadm(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    control = tmp_path / "control"
    control.touch()
    logged: list[str] = []
    settle_udev(logged.append, control)
    assert calls.read_text().split() == ["settle", "--timeout=60"]
    assert logged == []


def test_without_udevd_it_does_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_udevadm(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    settle_udev(print, tmp_path / "no-control")
    assert not calls.exists()


def test_a_busy_udev_is_logged_and_the_inventory_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_udevadm(tmp_path / "bin", 1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    control = tmp_path / "control"
    control.touch()
    logged: list[str] = []
    settle_udev(logged.append, control)
    assert len(logged) == 1 and "udev still busy after 60 s (udevadm settle exited 1)" in logged[0]


def test_no_udevadm_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    control = tmp_path / "control"
    control.touch()
    settle_udev(print, control)  # returns: nothing to wait for
