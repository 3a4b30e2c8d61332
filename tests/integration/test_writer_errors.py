"""`sledge-agent write` and `verify` on bad arguments and failing targets: clear errors that name
the thing and the expectation, exit codes a script can rely on."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from controller.images.importer import ImportOptions, import_image
from controller.images.sources import RawSource
from controller.images.store import WritableStore
from tests.images import MiB, random_bytes, write_image


def agent(*args: str, preexec: object = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=preexec,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, str]:
    src = write_image(tmp_path / "img.raw", 4 * MiB, [(0, random_bytes(4 * MiB, 5))])
    writable = WritableStore(tmp_path / "store")
    raw = RawSource(str(src))
    try:
        digest = import_image(writable, raw, ImportOptions("e", "1", chunk_size=MiB)).digest
    finally:
        raw.close()
    return writable.root, digest


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
