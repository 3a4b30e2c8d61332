"""The erase job on loop devices: signatures gone (blkid, sgdisk), disks in parallel, read-only skipped."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import protocol as p
from agent.hardware.inventory import collect
from agent.runtime.config import AgentConfig
from agent.runtime.devices import BlockDisks, HttpSources
from agent.runtime.jobs import JobContext
from agent.runtime.jobs.erase import erase
from agent.runtime.machine import FakeMachine

pytestmark = pytest.mark.root
MiB = 1 << 20


def blkid(dev: str, offset: int = 0) -> str:
    """What blkid -p finds ("" for nothing). It exits 2 for "nothing found" and for a device it
    cannot read alike, so the device is read here first: "" cannot come from a bad path."""
    with open(dev, "rb") as f:
        f.seek(offset)
        assert len(f.read(4096)) == 4096, dev
    cmd = ["blkid", "-p", "-o", "export"] + (["-O", str(offset)] if offset else []) + [dev]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode in (0, 2), f"{cmd}: exit {out.returncode}: {out.stderr}"  # 2: nothing found
    return out.stdout


def formatted_disk(loop_device: Callable[..., str]) -> str:
    dev = loop_device(256 * MiB)
    subprocess.run(["sgdisk", "-n", "1:2048:+100M", "-n", "2:0:0", dev], check=True, capture_output=True)
    for start in (MiB, 101 * MiB):  # the kernel here does not parse tables: format through offsets
        part = subprocess.run(
            ["losetup", "-f", "--show", "-o", str(start), "--sizelimit", str(100 * MiB), dev],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", part], check=True)
        subprocess.run(["losetup", "-d", part], check=True)
    assert "TYPE=ext4" in blkid(dev, MiB) and "TYPE=ext4" in blkid(dev, 101 * MiB)
    assert "PTTYPE=gpt" in blkid(dev)
    return dev


def context(
    disks: list[str], mode: p.EraseMode, hints: dict[str, str] | None = None
) -> tuple[JobContext, list[str]]:
    inv = collect()
    chosen = tuple(dataclasses.replace(d, kind="disk") for d in inv.disks if d.path in disks)
    lines: list[str] = []
    params = p.JobParams(erase_mode=mode, disk=p.DiskHints.of(hints or {}))
    assignment = p.Assignment("j-000000000001", p.JobKind.ERASE, 1, 1, 60.0, params)
    ctx = JobContext(
        assignment,
        AgentConfig(),
        FakeMachine(dataclasses.replace(inv, disks=chosen)),
        HttpSources(),
        BlockDisks(),
        lambda kind, message, done, total: lines.append(f"{kind.value}: {message}"),
        threading.Event(),
        lambda inv: None,
    )
    return ctx, lines


def test_metadata_erase_removes_every_signature_on_all_disks(loop_device: Callable[..., str]) -> None:
    a, b = formatted_disk(loop_device), formatted_disk(loop_device)
    ctx, _ = context([a, b], p.EraseMode.METADATA)
    outcome = erase(ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    for dev in (a, b):
        assert blkid(dev) == "" and blkid(dev, MiB) == "" and blkid(dev, 101 * MiB) == ""
        # no table either: blkid -p reports PTTYPE for any GPT or MBR it still finds
        assert dev in outcome.result.disk


def test_full_erase_zeroes_everything_of_the_hinted_disk_only(loop_device: Callable[..., str]) -> None:
    a, b = formatted_disk(loop_device), formatted_disk(loop_device)
    name = Path(a).name
    ctx, _ = context([a, b], p.EraseMode.FULL, {"name": name})
    outcome = erase(ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    with open(a, "rb") as f:
        assert f.read().count(0) == 256 * MiB
    assert "TYPE=ext4" in blkid(b, MiB)  # not named by the hints: untouched


def test_read_only_disk_is_skipped_with_a_note(loop_device: Callable[..., str], tmp_path: Path) -> None:
    a = formatted_disk(loop_device)
    backing = tmp_path / "ro.img"
    backing.write_bytes(b"\xaa" * MiB)
    ro = subprocess.run(
        ["losetup", "-f", "--show", "-r", str(backing)], check=True, capture_output=True, text=True
    )
    ro_dev = ro.stdout.strip()
    try:
        ctx, lines = context([a, ro_dev], p.EraseMode.METADATA)
        outcome = erase(ctx)
    finally:
        subprocess.run(["losetup", "-d", ro_dev], check=False)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED
    assert f"{ro_dev} skipped: read-only" in outcome.result.message
    assert any(f"{ro_dev} skipped" in line for line in lines)
    assert backing.read_bytes() == b"\xaa" * MiB
