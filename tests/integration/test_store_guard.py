"""One guarded reader for every store file: a FIFO planted where a chunk, manifest or
catalog entry should be is a clear error for export, verify, list and serving, not a hang.

The CLI runs as a subprocess with a timeout, so a read that blocks on the FIFO fails the
test instead of hanging it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.image import layout
from agent.image.manifest import Manifest
from tests.images import MiB, random_bytes, random_image
from tests.stores import import_store
from tests.unit.test_controller_kit import AioClient, start

HANG = 30  # seconds: far more than any of these takes, far less than forever


def sledge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=HANG
    )


def fifo_store(tmp_path: Path) -> tuple[Path, Manifest, str, Path]:
    """A store of a random 4 MiB image whose third chunk file is a FIFO."""
    root, manifest, digest = import_store(tmp_path / "store", random_image(tmp_path / "src", 4 * MiB))
    chunk = root / layout.chunk_path(manifest.chunk(2).hex)
    chunk.unlink()
    os.mkfifo(chunk)
    return root, manifest, digest, chunk


def test_export_to_a_file_refuses_a_fifo_chunk_and_leaves_the_destination(tmp_path: Path) -> None:
    root, _, _, chunk = fifo_store(tmp_path)
    dest = tmp_path / "out.img"
    dest.write_bytes(b"previous content")
    out = sledge("image", "export", "img:1", str(dest), "--store", str(root))
    assert out.returncode == 1
    assert f"{chunk}: expected a regular file, found a FIFO" in out.stderr
    assert "chunk 2 " in out.stderr and "Traceback" not in out.stderr
    assert dest.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.img")] == []


@pytest.mark.root
def test_export_to_a_device_refuses_a_fifo_chunk_before_writing(
    tmp_path: Path, loop_device: Callable[[int], str]
) -> None:
    root, _, _, chunk = fifo_store(tmp_path)
    dev = loop_device(8 * MiB)
    before = random_bytes(8 * MiB, 9)
    with open(dev, "r+b") as f:
        f.write(before)
    out = sledge("image", "export", "img:1", dev, "--store", str(root))
    assert out.returncode == 1
    assert f"{chunk}: expected a regular file, found a FIFO" in out.stderr
    with open(dev, "rb") as f:
        assert f.read() == before  # checked before the first write


def test_verify_names_a_fifo_chunk_as_bad(tmp_path: Path) -> None:
    root, _, digest, chunk = fifo_store(tmp_path)
    out = sledge("image", "verify", "--store", str(root))
    assert out.returncode == 1
    assert f"BAD {chunk}: expected a regular file, found a FIFO (used by {digest[:16]})" in out.stdout
    assert "1 bad chunks" in out.stdout


def test_a_fifo_manifest_or_catalog_entry_is_an_error_not_a_hang(tmp_path: Path) -> None:
    root, _, digest = import_store(tmp_path / "store", random_image(tmp_path / "src", MiB))
    entry = root / layout.catalog_path("img", "1")
    entry.unlink()
    os.mkfifo(entry)
    out = sledge("image", "list", "--store", str(root))
    assert out.returncode == 1
    assert f"{entry}: expected a regular file, found a FIFO" in out.stderr
    entry.unlink()
    entry.write_text(digest + "\n")
    manifest = root / layout.manifest_path(digest)
    manifest.unlink()
    os.mkfifo(manifest)
    out = sledge("image", "show", "img:1", "--store", str(root))
    assert out.returncode == 1
    assert f"{manifest}: expected a regular file, found a FIFO" in out.stderr


async def test_serving_refuses_a_fifo_in_the_store(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    root, manifest, digest = import_store(h.config.store_dir, random_image(tmp_path / "src", 2 * MiB))
    chunk = manifest.chunk(1).hex
    for relative in (layout.chunk_path(chunk), layout.manifest_path(digest)):
        (root / relative).unlink()
        os.mkfifo(root / relative)
    r = await h.client.get(f"/v1/store/chunks/{chunk[:2]}/{chunk}")
    assert r.status == 404
    error = (await r.json())["error"]
    reason = "not servable from the chunk store: expected a regular file, found a FIFO"
    assert error == f"{layout.chunk_path(chunk)}: {reason}"
    assert str(root) not in error
    r = await h.client.get(f"/v1/store/manifests/{digest}")
    assert r.status == 404 and "found a FIFO" in (await r.json())["error"]
