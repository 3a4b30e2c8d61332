"""`sledge-agent write` and `verify` on bad arguments and failing targets: clear errors that name
the thing and the expectation, exit codes a script can rely on."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chunkserver import serve
from tests.images import MiB, random_bytes, write_image
from tests.stores import import_store


@contextlib.contextmanager
def sigint_raises_in_children() -> Iterator[None]:
    """Children started inside get SIGINT at its default, so Python there turns it into
    KeyboardInterrupt. A shell without job control (a script, CI) starts `cmd &` with SIGINT
    ignored, the ignore is inherited through exec, and Python keeps an ignored SIGINT ignored: a
    suite started that way once saw the agent finish the write and exit 0 after the signal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def agent(*args: str, preexec: object = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=preexec,  # type: ignore[arg-type]
        timeout=120,  # a hang is a failure, not a stuck suite
    )


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, str]:
    src = write_image(tmp_path / "img.raw", 4 * MiB, [(0, random_bytes(4 * MiB, 5))])
    root, _, digest = import_store(tmp_path / "store", src, "e")
    return root, digest


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--retries", "0"),
        ("--retries", "-1"),
        ("--stall-timeout", "0"),
        ("--workers", "0"),
        ("--retries", "x"),
    ],
)
def test_nonsense_numbers_are_refused_before_anything_is_touched(
    tmp_path: Path, store: tuple[Path, str], flag: str, value: str
) -> None:
    root, digest = store
    dest = tmp_path / "out.img"
    out = agent("write", "--manifest", str(root / "manifests" / digest), "--device", str(dest), flag, value)
    assert out.returncode == 2
    assert flag in out.stderr and ("expected a value > 0" in out.stderr or "expected a int" in out.stderr)
    assert not dest.exists()


def test_a_failing_target_write_names_the_target_and_the_chunk(
    tmp_path: Path, store: tuple[Path, str]
) -> None:
    root, digest = store
    dest = tmp_path / "out.img"
    with open(dest, "wb") as f:
        f.truncate(4 * MiB)  # exists at full size: only the chunk writes past the limit fail

    def limit() -> None:  # writes past 2 MiB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, 2 * MiB))

    out = agent(
        "write",
        "--manifest",
        str(root / "manifests" / digest),
        "--device",
        str(dest),
        "--no-inplace",
        preexec=limit,
    )
    assert out.returncode == 1
    assert f"target {dest}: writing chunk " in out.stderr and "File too large" in out.stderr


def test_write_pins_a_manifest_by_digest(tmp_path: Path, store: tuple[Path, str]) -> None:
    root, digest = store
    copy = tmp_path / "latest.manifest"
    copy.write_bytes((root / "manifests" / digest).read_bytes())
    dest = tmp_path / "out.img"
    base = ["write", "--manifest", str(copy), "--source", str(root), "--device", str(dest)]
    wrong = agent(*base, "--digest", "0" * 64)
    assert wrong.returncode == 1 and f"expected blake3 {'0' * 64}, got {digest}" in wrong.stderr
    assert not dest.exists() or dest.stat().st_size == 0
    assert agent(*base, "--digest", digest.upper()).returncode == 0


def test_ctrl_c_stops_every_thread_before_the_target_is_closed(tmp_path: Path) -> None:
    """SIGINT mid-write: exit 130 soon, every chunk-sized region old or new (no thread writes after
    the fds are closed), and a re-run finishes the job. The server holds every chunk request past
    the sixth until the agent has exited, so the write cannot finish before the signal lands; with
    a 600 s stall timeout a held request ends early only if the cancel cuts it, so a Ctrl-C that
    waited for the requests' deadlines hangs past communicate()'s timeout instead of passing."""
    data = random_bytes(24 * MiB, 6)
    src = write_image(tmp_path / "img.raw", 24 * MiB, [(0, data)])
    root, _, digest = import_store(tmp_path / "store", src, "c")
    dest = tmp_path / "out.img"
    old = random_bytes(24 * MiB, 7)
    dest.write_bytes(old)
    with serve(root) as server:
        server.hold_after = 6  # 24 chunks: some written, the rest held
        argv = [sys.executable, "-m", "agent.cli", "write", "--manifest", f"{server.url}/manifests/{digest}"]
        with sigint_raises_in_children():
            proc = subprocess.Popen(
                [*argv, "--device", str(dest), "--stall-timeout", "600"], stderr=subprocess.PIPE, text=True
            )
        try:
            deadline = time.monotonic() + 60
            while server.held == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.held > 0 and proc.poll() is None, "the agent never reached a held chunk"
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            server.release()
            proc.kill()
            proc.wait()
        assert proc.returncode == 130, err
        assert "interrupted" in err
        written = dest.read_bytes()
        kept = [off for off in range(0, len(data), MiB) if written[off : off + MiB] == old[off : off + MiB]]
        for off in range(0, len(data), MiB):
            assert written[off : off + MiB] in (old[off : off + MiB], data[off : off + MiB]), off
        assert len(kept) >= 18  # only the 6 chunks served before the hold can have been written
        server.hold_after = None
        assert agent("write", *argv[4:], "--device", str(dest)).returncode == 0
    assert dest.read_bytes() == data


def test_a_file_target_ends_exactly_the_image(tmp_path: Path, store: tuple[Path, str]) -> None:
    """Like `bmaptool copy` and `dd`: a longer file is cut, so the file is the image afterwards."""
    root, digest = store
    dest = tmp_path / "out.img"
    dest.write_bytes(random_bytes(6 * MiB, 8))  # longer than the 4 MiB image, with old bytes
    out = agent("write", "--manifest", str(root / "manifests" / digest), "--device", str(dest))
    assert out.returncode == 0, out.stderr
    assert dest.stat().st_size == 4 * MiB
    assert dest.read_bytes() == random_bytes(4 * MiB, 5)  # the store fixture's image


def test_a_fifo_planted_in_a_store_is_a_bad_chunk_not_a_hang(tmp_path: Path, store: tuple[Path, str]) -> None:
    root, digest = store
    chunk = next(p for p in (root / "chunks").rglob("*") if p.is_file())
    chunk.unlink()
    os.mkfifo(chunk)
    dest = tmp_path / "out.img"
    out = agent(
        "write", "--manifest", str(root / "manifests" / digest), "--device", str(dest), "--retries", "1"
    )
    assert out.returncode == 1
    assert f"{chunk}: expected a regular file" in out.stderr


def test_a_missing_device_path_is_not_created(tmp_path: Path, store: tuple[Path, str]) -> None:
    """A typo in /dev, or a /dev/disk/by-id link whose disk is gone, must not become a file."""
    root, digest = store
    manifest = str(root / "manifests" / digest)
    missing = "/dev/sledge-test-no-such-disk"
    out = agent("write", "--manifest", manifest, "--device", missing)
    assert out.returncode == 1 and "does not exist" in out.stderr
    assert not os.path.lexists(missing)
    link = tmp_path / "by-id-link"
    link.symlink_to("/dev/sledge-test-gone")
    out = agent("write", "--manifest", manifest, "--device", str(link))
    assert out.returncode == 1 and "dangling symlink" in out.stderr
    assert not os.path.lexists("/dev/sledge-test-gone")


def test_verify_without_a_source_counts_every_difference_as_drift(
    tmp_path: Path, store: tuple[Path, str]
) -> None:
    """With the manifest alone (outside its store, no --source), the image's bytes cannot be had
    to tell table edits from drift: a differing chunk is drift (exit 1), not an error (exit 2)."""
    root, digest = store
    loose = tmp_path / "loose.manifest"
    loose.write_bytes((root / "manifests" / digest).read_bytes())
    dest = tmp_path / "disk.img"
    assert (
        agent("write", "--manifest", str(root / "manifests" / digest), "--device", str(dest)).returncode == 0
    )
    with open(dest, "r+b") as f:
        f.seek(3 * MiB + 7)
        f.write(b"drift")
    out = agent("verify", "--manifest", str(loose), "--digest", digest, "--device", str(dest))
    assert out.returncode == 1, out.stderr
    assert "differs: chunk 3 " in out.stdout
