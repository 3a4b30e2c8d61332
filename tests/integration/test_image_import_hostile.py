"""`sledge image import` of hostile images: nothing outside the image is ever read.

Every crafted image references a host file holding MARKER. Each is first shown to
leak that file through a plain `qemu-img convert` (so the test would catch an
inspector that lets it through), then imported: the import must fail naming the
file, the format and the reference, the store must be unchanged, and no chunk may
hold the marker. A second series switches the inspection off and shows the sandbox
alone still refusing.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from controller.cli import main
from controller.images.chain import ImportPolicy
from controller.images.importer import ImportOptions, import_image
from controller.images.sources import open_source
from controller.images.store import WritableStore
from tests import crafted
from tests.images import MiB, half_sparse_image, random_image
from tests.tools import need

MARKER = b"SLEDGE-HOST-SECRET-4d1c9e"


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-nbd", "qemu-io", "bwrap", "prlimit")


def plant(path: Path, size: int = 4 * MiB) -> Path:
    """The host file an attacker wants: the marker at several places, in every MiB."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            os.pwrite(f.fileno(), MARKER * 8, off + 4096)
    return path


def qimg(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def sledge(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def marker_in_chunks(store: Path) -> bool:
    for p in (store / "chunks").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if data[:4] == b"\x28\xb5\x2f\xfd":
                data = zstandard.ZstdDecompressor().decompress(data)
            if MARKER in data:
                return True
    return False


def leaks_through_plain_qemu(src: Path, tmp: Path, fmt: str | None = None) -> bool:
    out = tmp / "plain-qemu.raw"
    cmd = ["qemu-img", "convert", *(["-f", fmt] if fmt else []), "-O", "raw", str(src), str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    found = MARKER in out.read_bytes()
    out.unlink()
    return found


# --- the crafted images: each returns (image, the reference its refusal must name) ---------


def qcow2_backing_absolute(d: Path, secret: Path) -> tuple[Path, str]:
    qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", d / "evil.qcow2")
    return d / "evil.qcow2", str(secret)


def qcow2_backing_json(d: Path, secret: Path) -> tuple[Path, str]:
    name = "json:" + json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(secret)}})
    qimg("create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", d / "evil.qcow2", "4M")
    return d / "evil.qcow2", name


def qcow2_backing_relative(d: Path, secret: Path) -> tuple[Path, str]:
    (d / "sub").mkdir()
    name = os.path.relpath(secret, d / "sub")
    qimg("create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", d / "sub" / "evil.qcow2")
    return d / "sub" / "evil.qcow2", name


def qcow2_backing_chain_depth_2(d: Path, secret: Path) -> tuple[Path, str]:
    qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", d / "mid.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", d / "mid.qcow2", "-F", "qcow2", d / "evil.qcow2")
    return d / "evil.qcow2", str(d / "mid.qcow2")


def qcow2_data_file(d: Path, secret: Path) -> tuple[Path, str]:
    # qemu-img creates (empties) the data file: plant the secret again afterwards
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", d / "evil.qcow2", "4M")
    plant(secret)
    return d / "evil.qcow2", str(secret)


def vmdk_flat_descriptor(d: Path, secret: Path) -> tuple[Path, str]:
    text = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'\n# Extent description\nRW 8192 FLAT "{secret}" 0\n\n# The Disk Data Base\n#DDB\n'
        'ddb.virtualHWVersion = "4"\nddb.adapterType = "ide"\n'
    )
    (d / "evil.vmdk").write_text(text)
    return d / "evil.vmdk", str(secret)


def vmdk_split_extents(d: Path, secret: Path) -> tuple[Path, str]:
    qimg("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", d / "evil.vmdk", "4M")
    plant(d / "evil-f001.vmdk")  # the extent qemu made: another file all the same
    return d / "evil.vmdk", "evil-f001.vmdk"


def vmdk_sparse_capacity_0(d: Path, secret: Path) -> tuple[Path, str]:
    qimg("create", "-q", "-f", "vmdk", d / "evil.vmdk", "4M")
    data = bytearray((d / "evil.vmdk").read_bytes())
    struct.pack_into("<Q", data, 12, 0)  # capacity 0: qemu reads the embedded descriptor's extents
    desc = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW 8192 FLAT "{secret}" 0\n'
    ).encode()
    data[512 : 512 * 21] = desc.ljust(512 * 20, b"\0")
    (d / "evil.vmdk").write_bytes(data)
    return d / "evil.vmdk", str(secret)


def vmdk_parent(d: Path, secret: Path) -> tuple[Path, str]:
    qimg("convert", "-q", "-f", "raw", "-O", "vmdk", secret, d / "base.vmdk")
    qimg("create", "-q", "-f", "vmdk", "-b", d / "base.vmdk", "-F", "vmdk", d / "evil.vmdk")
    return d / "evil.vmdk", str(d / "base.vmdk")


HOSTILE: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "qcow2 backing, absolute": qcow2_backing_absolute,
    "qcow2 backing, json:": qcow2_backing_json,
    "qcow2 backing, relative": qcow2_backing_relative,
    "qcow2 backing chain": qcow2_backing_chain_depth_2,
    "qcow2 data file": qcow2_data_file,
    "vmdk monolithicFlat descriptor": vmdk_flat_descriptor,
    "vmdk twoGbMaxExtentFlat": vmdk_split_extents,
    "vmdk sparse, capacity 0": vmdk_sparse_capacity_0,
    "vmdk parent": vmdk_parent,
}


@pytest.fixture
def populated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A store that already holds one image, so 'unchanged' means something."""
    store = tmp_path / "store"
    src = random_image(tmp_path / "first.raw", 3 * MiB)
    assert (
        sledge(capsys, "image", "import", src, "--name", "first", "--version", "1", "--store", store)[0] == 0
    )
    return store


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_image_is_refused_before_anything_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], populated: Path, case: str
) -> None:
    secret = plant(tmp_path / "secret.raw")
    work = tmp_path / "work"
    work.mkdir()
    src, reference = HOSTILE[case](work, secret)
    assert leaks_through_plain_qemu(src, tmp_path), "the crafted image must really reach the host file"
    before = snapshot(populated)
    rc, out, err = sledge(capsys, "image", "import", src, "--name", "evil", "--store", populated)
    assert rc == 1
    assert str(src) in err and reference in err, err
    assert f"({'vmdk' if 'vmdk' in case else 'qcow2'})" in err, err
    assert snapshot(populated) == before
    assert not marker_in_chunks(populated)
    assert out == ""


@pytest.mark.parametrize("case", [c for c in HOSTILE if c != "vmdk twoGbMaxExtentFlat"])
def test_sandbox_alone_refuses_with_inspection_off(tmp_path: Path, case: str) -> None:
    """Inspection and node pinning off: qemu follows the header, and finds nothing there."""
    secret = plant(tmp_path / "secret.raw")
    src, reference = HOSTILE[case](tmp_path, secret)
    with pytest.raises(OSError, match=r"No such file or directory") as info:
        open_source(str(src), None, ImportPolicy(inspect=False, pin_nodes=False)).close()
    message = str(info.value)
    assert "(sandboxed) failed" in message
    assert os.path.basename(reference) in message or str(secret) in message, message


def test_sandbox_alone_refuses_split_extents(tmp_path: Path) -> None:
    src, _ = vmdk_split_extents(tmp_path, tmp_path / "unused")
    with pytest.raises(OSError, match=r"evil-f001\.vmdk"):
        open_source(str(src), None, ImportPolicy(inspect=False, pin_nodes=False)).close()


def test_pinned_nodes_alone_never_open_the_backing_file(tmp_path: Path) -> None:
    """Inspection off, pinning on: qemu is told the backing is null, reads zeros there."""
    secret = plant(tmp_path / "secret.raw")
    src, _ = qcow2_backing_absolute(tmp_path, secret)
    store = WritableStore(tmp_path / "store")
    source = open_source(str(src), None, ImportPolicy(inspect=False, pin_nodes=True))
    try:
        result = import_image(store, source, ImportOptions("pinned", "1"))
    finally:
        source.close()
    assert result.stats.data_chunks == 0
    assert not marker_in_chunks(tmp_path / "store")


def test_declared_raw_copies_a_qcow2_header_without_interpreting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = plant(tmp_path / "secret.raw")
    src, _ = qcow2_backing_absolute(tmp_path, secret)
    store = tmp_path / "store"
    rc, out, err = sledge(capsys, "image", "import", src, "--name", "r", "--version", "1", "--format", "raw",
                          "--store", store)  # fmt: skip
    assert rc == 0, err
    assert "(raw)" in out
    dest = tmp_path / "out"
    assert sledge(capsys, "image", "export", "r:1", dest, "--store", store)[0] == 0
    assert filecmp.cmp(src, dest, shallow=False)
    assert not marker_in_chunks(store)


def test_declared_format_must_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], populated: Path
) -> None:
    qimg("create", "-q", "-f", "vmdk", tmp_path / "disk.vmdk", "1M")
    before = snapshot(populated)
    rc, _, err = sledge(capsys, "image", "import", tmp_path / "disk.vmdk", "--name", "x", "--format", "qcow2",
                        "--store", populated)  # fmt: skip
    assert rc == 1
    assert f"image {tmp_path / 'disk.vmdk'} (qcow2) refused: declared format does not match" in err
    assert "'vmdk'" in err
    assert snapshot(populated) == before


def test_formats_off_the_allow_list_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], populated: Path
) -> None:
    raw = random_image(tmp_path / "r.raw", MiB)
    qimg("convert", "-q", "-f", "raw", "-O", "qed", raw, tmp_path / "d.qed")
    rc, _, err = sledge(capsys, "image", "import", tmp_path / "d.qed", "--name", "x", "--store", populated)
    assert rc == 1 and "(qed) refused: format not on the allow-list" in err


# --- well-formed images still import byte-identically ----------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("qcow2", []),
        ("qcow2", ["-c"]),
        ("vmdk", []),
        ("vmdk", ["-o", "subformat=streamOptimized"]),
        ("vhdx", []),
        ("vdi", []),
    ],
    ids=["qcow2", "qcow2-compressed", "vmdk", "vmdk-streamOptimized", "vhdx", "vdi"],
)
def test_well_formed_images_import_byte_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, options: list[str]
) -> None:
    raw = half_sparse_image(tmp_path / "src.raw", 12 * MiB)
    image = tmp_path / f"src.{fmt}"
    qimg("convert", "-q", "-f", "raw", "-O", fmt, *options, raw, image)
    store = tmp_path / "store"
    rc, out, err = sledge(capsys, "image", "import", image, "--name", "ok", "--version", "1", "--json",
                          "--store", store)  # fmt: skip
    assert rc == 0, err
    result = json.loads(out.splitlines()[0])
    assert result["format"] == fmt and result["backing_files"] == []
    dest = tmp_path / "out.raw"
    assert sledge(capsys, "image", "export", "ok:1", dest, "--store", store)[0] == 0
    assert filecmp.cmp(raw, dest, shallow=False)


@pytest.mark.root
@pytest.mark.parametrize("hostile", [False, True], ids=["well-formed", "backing"])
def test_qcow2_on_a_block_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loop_device: Callable[..., str], hostile: bool
) -> None:
    """A device node reaches the sandbox through its descriptor too (host_device protocol)."""
    raw = half_sparse_image(tmp_path / "src.raw", 6 * MiB)
    image = tmp_path / "src.qcow2"
    if hostile:
        secret = plant(tmp_path / "secret.raw")
        qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", image)
    else:
        qimg("convert", "-q", "-f", "raw", "-O", "qcow2", raw, image)
    dev = loop_device(16 * MiB, direct_io=False)
    with open(dev, "r+b") as f:
        f.write(image.read_bytes())
    store = tmp_path / "store"
    rc, _, err = sledge(capsys, "image", "import", dev, "--name", "b", "--version", "1", "--store", store)
    if hostile:
        assert rc == 1 and f"image {dev} (qcow2) refused: backing file" in err and str(secret) in err
        assert not marker_in_chunks(store)
        return
    assert rc == 0, err
    dest = tmp_path / "out.raw"
    assert sledge(capsys, "image", "export", "b:1", dest, "--store", store)[0] == 0
    assert filecmp.cmp(raw, dest, shallow=False)


def test_sandbox_works_without_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bwrap then builds its sandbox in a user namespace of its own (euid 65534 here)."""
    need("unshare")
    raw = half_sparse_image(tmp_path / "src.raw", 6 * MiB)
    qimg("convert", "-q", "-f", "raw", "-O", "qcow2", raw, tmp_path / "src.qcow2")
    secret = plant(tmp_path / "secret.raw")
    qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", tmp_path / "evil.qcow2")
    store = tmp_path / "store"
    runner = ["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-c"]
    code = (
        "import os, sys; from controller.cli import main; "
        "assert os.geteuid() == 65534; sys.exit(main(sys.argv[1:]))"
    )
    for src, wanted in (("src.qcow2", 0), ("evil.qcow2", 1)):
        argv = [*runner, code, "image", "import", str(tmp_path / src), "--name", "u", "--version", src,
                "--store", str(store)]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert proc.returncode == wanted, proc.stderr
    assert "refused: backing file" in proc.stderr
    assert sledge(capsys, "image", "export", "u:src.qcow2", tmp_path / "out", "--store", store)[0] == 0
    assert filecmp.cmp(raw, tmp_path / "out", shallow=False)
    assert not marker_in_chunks(store)


@pytest.mark.parametrize("fmt", ["vhdx", "vdi"])
def test_differencing_disks_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], populated: Path, fmt: str
) -> None:
    """Hand-made (qemu cannot make them): a VHDX with a parent locator, a differencing VDI."""
    secret = plant(tmp_path / "secret.raw")
    src = tmp_path / f"diff.{fmt}"
    if fmt == "vhdx":
        src.write_bytes(crafted.vhdx_image(parent_locator={"absolute_win32_path": str(secret)}))
        reference = f"absolute_win32_path={secret}"
    else:
        src.write_bytes(crafted.vdi(4, parent=b"\x42" * 16))
        reference = "42" * 16
    before = snapshot(populated)
    rc, _, err = sledge(capsys, "image", "import", src, "--name", "d", "--store", populated)
    assert rc == 1
    assert f"image {src} ({fmt}) refused:" in err and reference in err, err
    assert snapshot(populated) == before
    assert not marker_in_chunks(populated)
