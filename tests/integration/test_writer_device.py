"""The writer on real loop devices: safety refusals, zeroing, GPT relocation, resume after kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from agent.image.manifest import ChunkKind
from agent.writer.device import open_target
from agent.writer.errors import TargetError
from agent.writer.pipeline import WriteOptions
from agent.writer.sources import DirectorySource, HttpSource
from tests.chunkserver import serve
from tests.images import MiB, half_sparse_image, random_bytes, write_image
from tests.integration.test_writer import TIMEOUTS, make_store, write

pytestmark = pytest.mark.root
LoopFactory = Callable[..., str]


def read_dev(dev: str, n: int, offset: int = 0) -> bytes:
    with open(dev, "rb") as f:
        f.seek(offset)
        return f.read(n)


def fill(dev: str, byte: int, n: int) -> None:
    with open(dev, "r+b") as f:
        f.write(bytes([byte]) * n)


def test_write_to_loop_device_zeroes_zero_chunks_and_verifies(
    tmp_path: Path, loop_device: LoopFactory
) -> None:
    src = half_sparse_image(tmp_path / "src.img", 12 * MiB, stripe=MiB)
    data = src.read_bytes()
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(16 * MiB)
    fill(dev, 0xFF, 16 * MiB)
    from agent.writer.pipeline import WriteOptions

    report = write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
    assert read_dev(dev, len(data)) == data
    assert read_dev(dev, 4 * MiB, 12 * MiB) == b"\xff" * 4 * MiB  # past the image: untouched
    assert report.chunks_zero == sum(1 for c in manifest if c.kind is ChunkKind.ZERO) > 0
    assert report.verified
    again = write(manifest, digest, [DirectorySource(str(root))], dev)
    assert again.fetched_bytes == 0 and again.chunks_fetched == 0


def test_busy_device_is_refused(tmp_path: Path, loop_device: LoopFactory) -> None:
    dev = loop_device(8 * MiB)
    fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(TargetError, match="busy"):
            open_target(dev, MiB)
    finally:
        os.close(fd)


def test_mounted_device_is_refused(tmp_path: Path, loop_device: LoopFactory) -> None:
    dev = loop_device(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        with pytest.raises(TargetError, match=f"mounted on {mnt}"):
            open_target(dev, MiB)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    open_target(dev, MiB).close()  # unmounted: fine


def test_read_only_device_is_refused(tmp_path: Path) -> None:
    backing = tmp_path / "ro.img"
    backing.write_bytes(bytes(4 * MiB))
    dev = subprocess.run(
        ["losetup", "-f", "--show", "-r", str(backing)], check=True, capture_output=True, text=True
    )
    name = dev.stdout.strip()
    try:
        with pytest.raises(TargetError, match=r"read-only|cannot open for writing"):
            open_target(name, MiB)
    finally:
        subprocess.run(["losetup", "-d", name], check=False)


def test_too_small_device_is_refused_before_writing(tmp_path: Path, loop_device: LoopFactory) -> None:
    src = write_image(tmp_path / "s.img", 8 * MiB, [(0, random_bytes(8 * MiB, 1))])
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(4 * MiB)
    fill(dev, 0xAB, 4 * MiB)
    with pytest.raises(TargetError, match=f"image needs {8 * MiB} bytes, device has {4 * MiB}"):
        write(manifest, digest, [DirectorySource(str(root))], dev)
    assert read_dev(dev, 4 * MiB) == b"\xab" * 4 * MiB


def test_a_device_backing_another_loop_device_is_refused(tmp_path: Path, loop_device: LoopFactory) -> None:
    """The stack is visible nowhere else (no holder, no mount of the device itself)."""
    lower = loop_device(8 * MiB)
    upper = subprocess.run(["losetup", "-f", "--show", lower], check=True, capture_output=True, text=True)
    name = upper.stdout.strip()
    try:
        with pytest.raises(TargetError, match=f"{Path(lower).name} backs loop device {Path(name).name}"):
            open_target(lower, MiB)
    finally:
        subprocess.run(["losetup", "-d", name], check=False)


def test_a_file_backing_a_loop_device_is_refused(tmp_path: Path, loop_device: LoopFactory) -> None:
    dev = loop_device(8 * MiB, name="backing.img")
    backing = next(tmp_path.glob("*-backing.img"))
    with pytest.raises(TargetError, match=f"it backs loop device {Path(dev).name}"):
        open_target(str(backing), MiB, exact_file=True)
    assert backing.stat().st_size == 8 * MiB  # not cut to the image's size


def test_a_read_only_partition_refuses_the_whole_disk(tmp_path: Path, loop_device: LoopFactory) -> None:
    dev = loop_device(16 * MiB)
    subprocess.run(["sgdisk", "-n", "1:2048:+4M", dev], check=True, capture_output=True)
    subprocess.run(["partx", "-a", dev], check=True, capture_output=True)  # this kernel parses no tables
    part = f"{dev}p1"
    try:
        subprocess.run(["blockdev", "--setro", part], check=True)
        with pytest.raises(TargetError, match=f"{Path(part).name} is read-only"):
            open_target(dev, MiB)
    finally:
        subprocess.run(["blockdev", "--setrw", part], check=False)
        subprocess.run(["partx", "-d", dev], check=False, capture_output=True)


def sgdisk_report(dev: str) -> str:
    return subprocess.run(["sgdisk", "-v", dev], capture_output=True, text=True).stdout


def sgdisk_ok(dev: str) -> bool:
    return "No problems found" in sgdisk_report(dev)


@pytest.mark.parametrize("fix", [True, False])
def test_backup_gpt_moves_to_the_end_of_a_larger_disk(
    tmp_path: Path, loop_device: LoopFactory, fix: bool
) -> None:
    from agent.writer.pipeline import WriteOptions

    src = tmp_path / "gpt.img"
    src.write_bytes(b"")
    os.truncate(src, 16 * MiB)
    subprocess.run(
        ["sgdisk", "-n", "1:2048:+4M", "-t", "1:8300", "-n", "2:0:0", str(src)],
        check=True,
        capture_output=True,
    )
    assert sgdisk_ok(str(src))
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(64 * MiB)
    # --verify reads back after the move: the table sectors sledge rewrote are not drift
    report = write(
        manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(fix_gpt=fix, verify=True)
    )
    assert report.gpt_relocated is fix and report.verified
    table_report = sgdisk_report(dev)
    if fix:
        assert "No problems found" in table_report, table_report
    else:  # the misplaced backup and nothing else (not a device sgdisk could not read)
        assert "secondary header's self-pointer" in table_report, table_report
        assert "Identified 1 problems" in table_report, table_report
    if fix:
        # the partitions are unchanged
        table = subprocess.run(["sgdisk", "-p", dev], capture_output=True, text=True).stdout
        assert "8.0 KiB" not in table and " 1 " in table and " 2 " in table
    # `sledge-agent verify` agrees, and still sees drift outside the table in the same chunk
    manifest_path = str(root / "manifests" / digest)
    verify = [sys.executable, "-m", "agent.cli", "verify", "--manifest", manifest_path, "--device", dev]
    held = subprocess.run(verify, capture_output=True, text=True)
    assert held.returncode == 0, held.stderr
    assert ("table: chunk 0" in held.stdout) is fix
    with open(dev, "r+b") as f:
        f.seek(64 * 1024)  # chunk 0 again, past the GPT's entries
        f.write(b"drift")
    drifted = subprocess.run(verify, capture_output=True, text=True)
    assert drifted.returncode == 1 and "differs: chunk 0 " in drifted.stdout


def test_a_hybrid_mbr_is_left_as_sgdisk_leaves_it(tmp_path: Path, loop_device: LoopFactory) -> None:
    """Growing the 0xEE entry of a hybrid MBR would overlap its other entries."""
    src = tmp_path / "hybrid.img"
    src.write_bytes(b"")
    os.truncate(src, 16 * MiB)
    run = ["sgdisk", "-n", "1:2048:+4M", "-t", "1:0700", "-n", "2:0:0", "-h", "1", str(src)]
    subprocess.run(run, check=True, capture_output=True)
    mbr = src.read_bytes()[:512]
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(64 * MiB)
    report = write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
    assert report.gpt_relocated and report.verified
    assert read_dev(dev, 512) == mbr
    assert sgdisk_ok(dev)


def test_a_device_with_8_kib_logical_blocks_takes_a_4_kib_tail(tmp_path: Path) -> None:
    """O_DIRECT lengths follow the device's logical block: a 4 KiB tail goes through the page cache."""
    size = 3 * MiB + 12 * 1024
    src = write_image(tmp_path / "t.img", size, [(0, random_bytes(size, 12))])
    root, manifest, digest = make_store(tmp_path, src)
    backing = tmp_path / "8k.img"
    backing.write_bytes(b"")
    os.truncate(backing, 8 * MiB)
    made = subprocess.run(
        ["losetup", "-f", "--show", "--direct-io=on", "--sector-size", "8192", str(backing)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.fail(f"losetup --sector-size 8192: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        write(manifest, digest, [DirectorySource(str(root))], dev, WriteOptions(verify=True))
        again = write(manifest, digest, [DirectorySource(str(root))], dev)
        assert again.chunks_inplace == len(manifest) and again.fetched_bytes == 0
        assert read_dev(dev, size) == src.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_resume_after_a_killed_write_fetches_only_what_is_missing(
    tmp_path: Path, loop_device: LoopFactory
) -> None:
    src = write_image(tmp_path / "r.img", 40 * MiB, [(0, random_bytes(40 * MiB, 21))])
    data = src.read_bytes()
    root, manifest, digest = make_store(tmp_path, src)
    dev = loop_device(40 * MiB)
    with serve(root) as server:
        server.delay = 0.05
        cmd = [
            sys.executable,
            "-m",
            "agent.cli",
            "write",
            "--manifest",
            f"{server.url}/manifests/{digest}",
            "--device",
            dev,
            "--workers",
            "2",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while sum(server.requests.values()) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        on_disk = read_dev(dev, len(data))
        present = {
            c.index
            for c in manifest
            if blake3.blake3(on_disk[c.offset : c.offset + c.length]).digest() == c.digest
        }
        assert 8 <= len(present) < len(manifest)
        server.requests.clear()
        server.delay = 0.0
        report = write(manifest, digest, [HttpSource(server.url, TIMEOUTS)], dev)
        assert read_dev(dev, len(data)) == data
        assert report.chunks_inplace == len(present)
        assert report.chunks_fetched == len(manifest) - len(present)
        assert set(server.requests) == {
            manifest.chunk(i).hex for i in range(len(manifest)) if i not in present
        }
