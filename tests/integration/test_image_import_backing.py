"""`sledge image import --allow-backing DIR`: an overlay may read its chain only from under DIR."""

from __future__ import annotations

import filecmp
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.images import MiB, random_image
from tests.integration.test_image_import_hostile import (
    MARKER,
    marker_in_chunks,
    plant,
    qimg,
    sledge,
    snapshot,
)
from tests.tools import need


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-nbd", "qemu-io", "bwrap", "prlimit")


def qemu_io_write(image: Path, pattern: int, offset: int, length: int) -> None:
    cmd = ["qemu-io", "-c", f"write -P {pattern} {offset} {length}", str(image)]
    subprocess.run(cmd, check=True, capture_output=True)


def import_json(
    capsys: pytest.CaptureFixture[str], src: Path, store: Path, *extra: str | Path
) -> dict[str, object]:
    rc, out, err = sledge(capsys, "image", "import", src, "--name", "o", "--version", "1", "--json",
                          "--store", store, *extra)  # fmt: skip
    assert rc == 0, err
    result: dict[str, object] = json.loads(out.splitlines()[0])
    return result


def test_overlay_chain_under_the_directory_imports_and_is_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bases = tmp_path / "bases"
    bases.mkdir()
    random_image(bases / "base.raw", 8 * MiB)
    qimg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", bases / "mid.qcow2")
    qemu_io_write(bases / "mid.qcow2", 0x33, 2 * MiB, 64 << 10)
    overlay = tmp_path / "overlay.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", bases / "mid.qcow2", "-F", "qcow2", overlay)
    qemu_io_write(overlay, 0x5A, 5 * MiB, MiB)
    expected = tmp_path / "expected.raw"
    qimg("convert", "-q", "-O", "raw", overlay, expected)

    store = tmp_path / "store"
    result = import_json(capsys, overlay, store, "--allow-backing", bases)
    assert result["backing_files"] == [str(bases / "mid.qcow2"), str(bases / "base.raw")]
    rc, out, _ = sledge(capsys, "image", "import", overlay, "--name", "o", "--version", "2", "--store", store,
                        "--allow-backing", bases)  # fmt: skip
    assert rc == 0
    assert f"read backing file {bases / 'mid.qcow2'} (under --allow-backing {bases})" in out
    assert f"read backing file {bases / 'base.raw'}" in out
    dest = tmp_path / "out.raw"
    assert sledge(capsys, "image", "export", "o:1", dest, "--store", store)[0] == 0
    assert filecmp.cmp(expected, dest, shallow=False)


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, src: Path, allow: Path, *words: str) -> None:
    store = tmp_path / "store"
    rc, _, err = sledge(capsys, "image", "import", random_image(tmp_path / "seed.raw", MiB), "--name", "seed",
                        "--store", store)  # fmt: skip
    assert rc == 0
    before = snapshot(store)
    rc, out, err = sledge(
        capsys, "image", "import", src, "--name", "x", "--store", store, "--allow-backing", allow
    )
    assert rc == 1
    assert out == ""
    for word in words:
        assert word in err, err
    assert snapshot(store) == before
    assert not marker_in_chunks(store)


def test_backing_outside_the_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = plant(tmp_path / "secret.raw")
    allow = tmp_path / "bases"
    allow.mkdir()
    qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", tmp_path / "o.qcow2")
    src = tmp_path / "o.qcow2"
    _refused(capsys, tmp_path, src, allow, str(src), "outside --allow-backing", str(secret))


def test_second_layer_escaping_the_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plant(tmp_path / "secret.raw")
    allow = tmp_path / "bases"
    allow.mkdir()
    qimg("create", "-q", "-f", "qcow2", "-b", "../secret.raw", "-F", "raw", allow / "mid.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", allow / "mid.qcow2", "-F", "qcow2", tmp_path / "o.qcow2")
    _refused(capsys, tmp_path, tmp_path / "o.qcow2", allow, f"image {allow / 'mid.qcow2'} (qcow2)",
             "outside --allow-backing", "'../secret.raw'")  # fmt: skip


def test_symlink_out_of_the_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = plant(tmp_path / "secret.raw")
    allow = tmp_path / "bases"
    allow.mkdir()
    os.symlink(secret, allow / "base.raw")
    qimg("create", "-q", "-f", "qcow2", "-b", allow / "base.raw", "-F", "raw", tmp_path / "o.qcow2")
    _refused(
        capsys, tmp_path, tmp_path / "o.qcow2", allow, "outside --allow-backing", f"resolves to {secret}"
    )


def test_json_backing_is_refused_even_inside_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allow = tmp_path / "bases"
    allow.mkdir()
    plant(allow / "base.raw")
    name = "json:" + json.dumps(
        {"driver": "raw", "file": {"driver": "file", "filename": str(allow / "base.raw")}}
    )
    qimg("create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", tmp_path / "o.qcow2", "4M")
    _refused(capsys, tmp_path, tmp_path / "o.qcow2", allow, "not a plain path", "json:")


def test_backing_without_a_declared_format_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allow = tmp_path / "bases"
    allow.mkdir()
    plant(allow / "base.raw")
    overlay = tmp_path / "o.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", allow / "base.raw", "-F", "raw", overlay)
    data = bytearray(overlay.read_bytes())
    ext = data.index(struct.pack(">I", 0xE2792ACA))  # the backing format extension, first after the header
    data[ext : ext + 4] = struct.pack(">I", 0x0BADF00D)  # an unknown (ignored) extension instead
    overlay.write_bytes(data)
    _refused(capsys, tmp_path, overlay, allow, "without a declared format", str(allow / "base.raw"))


def test_backing_loop_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow = tmp_path / "bases"
    allow.mkdir()
    qimg("create", "-q", "-f", "qcow2", allow / "a.qcow2", "1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", allow / "b.qcow2")
    qimg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", allow / "a.qcow2")
    _refused(capsys, tmp_path, allow / "b.qcow2", allow, "loops back", "b.qcow2")


def test_marker_is_what_the_base_holds(tmp_path: Path) -> None:
    """The refusals above are about reading: plant() does put MARKER where qemu would read it."""
    data = plant(tmp_path / "s.raw").read_bytes()
    assert data.count(MARKER) == 4 * 8
