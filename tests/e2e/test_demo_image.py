"""The demo's bootable disk image (scripts/build-demo-image): it boots in QEMU from its own MBR
(SeaBIOS -> syslinux mbr.bin -> extlinux -> Debian kernel -> busybox /init), prints its marker on
the serial console and powers off; its bytes depend only on the marker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20

pytestmark = [pytest.mark.root]


def build(out: Path, marker: str) -> Path:
    need("extlinux", "sfdisk", "mkfs.ext4", "cpio", "zstd", "busybox")
    subprocess.run(
        [str(REPO / "scripts" / "build-demo-image"), str(out), "--marker", marker], check=True, timeout=1200
    )
    return out


def leftovers() -> list[str]:
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    mounts = Path("/proc/self/mounts").read_text()
    return [line for line in (loops + mounts).splitlines() if "sledge-demo-image" in line]


def chunk_digests(path: Path, size: int = MIB) -> list[str]:
    with open(path, "rb") as f:
        return [hashlib.sha256(block).hexdigest() for block in iter(lambda: f.read(size), b"")]


@pytest.mark.qemu
def test_boots_prints_the_marker_and_powers_off(tmp_path: Path) -> None:
    need("qemu-system-x86_64")
    marker = f"SLEDGE-DEMO-IMAGE-BOOTED test-{os.getpid()}"
    image = build(tmp_path / "demo.img", marker)
    assert image.stat().st_size == 64 * MIB
    assert not leftovers(), "build-demo-image left a loop device or a mount behind"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nographic",
        "-drive",
        f"file={image},format=raw",
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
    except subprocess.TimeoutExpired as exc:  # run() has killed QEMU already
        tail = (exc.stdout or b"")[-2000:].decode(errors="replace")
        raise AssertionError(f"QEMU did not power off within 180 s; console:\n{tail}") from None
    elapsed = time.monotonic() - started
    console = done.stdout.decode(errors="replace")
    assert marker in console, console[-2000:]
    assert "SYSLINUX" in console  # booted through the disk's own boot loader
    assert done.returncode == 0, console[-2000:]
    print(f"\ndemo image: power-on to powered off {elapsed:.1f} s")


def test_same_marker_same_bytes_and_a_new_marker_changes_little(tmp_path: Path) -> None:
    v1 = chunk_digests(build(tmp_path / "v1.img", "SLEDGE-DEMO-IMAGE-BOOTED v1"))
    again = chunk_digests(build(tmp_path / "v1-again.img", "SLEDGE-DEMO-IMAGE-BOOTED v1"))
    v2 = chunk_digests(build(tmp_path / "v2.img", "SLEDGE-DEMO-IMAGE-BOOTED v2"))
    assert v1 == again
    changed = [i for i, (a, b) in enumerate(zip(v1, v2, strict=True)) if a != b]
    assert 0 < len(changed) <= 8, f"v1 -> v2 changed MiB {changed}"
    assert not leftovers()
