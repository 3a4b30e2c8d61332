"""`sledge image` end to end on real sparse files, qcow2 through qemu-nbd, and a loop device."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.image import layout
from controller.cli import main
from controller.images.store import WritableStore
from tests.images import MiB, half_sparse_image, random_bytes, random_image, write_image
from tests.tools import need


def sledge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def imported(capsys: pytest.CaptureFixture[str], store: Path, src: Path, name: str, *extra: str) -> str:
    rc, out, err = sledge(capsys, "image", "import", str(src), "--name", name, "--store", str(store), *extra)
    assert rc == 0, err
    digest = out.strip().splitlines()[-1]
    assert len(digest) == 64
    return digest


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize(
    "kind",
    ["random", "half-sparse", "all-zero", "odd-size", "tiny"],
)
def test_round_trip_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    src = tmp_path / "src.img"
    if kind == "random":
        random_image(src, 12 * MiB)
    elif kind == "half-sparse":
        half_sparse_image(src, 32 * MiB)
    elif kind == "all-zero":
        write_image(src, 16 * MiB, [])
    elif kind == "odd-size":
        random_image(src, 9 * MiB + 12345)
    else:
        random_image(src, 1)
    store = tmp_path / "store"
    digest = imported(capsys, store, src, "img", "--version", "1", "--chunk-size", "1M")
    dest = tmp_path / "out.img"
    rc, _, err = sledge(capsys, "image", "export", "img:1", str(dest), "--store", str(store))
    assert rc == 0, err
    assert filecmp.cmp(src, dest, shallow=False)
    assert dest.stat().st_size == src.stat().st_size
    if kind == "all-zero":
        assert allocated(dest) == 0  # export is sparse
        assert list((store / "chunks").rglob("*")) == []  # zero chunks are stored nowhere
    m = WritableStore(store).manifest(digest)
    assert m.image_size == src.stat().st_size


def test_identical_chunks_stored_once_and_compression_only_when_smaller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    block = random_bytes(MiB, 7)
    text = b"compressible " * (MiB // 13) + b"x" * (MiB % 13)
    src = write_image(
        tmp_path / "dup.img", 5 * MiB, [(0, block), (MiB, block), (2 * MiB, text), (4 * MiB, block)]
    )
    store = tmp_path / "store"
    digest = imported(capsys, store, src, "dup", "--chunk-size", "1M")
    m = WritableStore(store).manifest(digest)
    kinds = [(c.kind.name, c.encoding.name) for c in m]
    assert kinds == [
        ("DATA", "RAW"),
        ("DATA", "RAW"),
        ("DATA", "ZSTD"),
        ("ZERO", "RAW"),
        ("DATA", "RAW"),
    ]
    assert m.chunk(2).stored_len < MiB // 10
    files = sorted(p for p in (store / "chunks").rglob("*") if p.is_file())
    assert len(files) == 2


def test_sparse_64g_imports_in_proportion_to_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_image(
        tmp_path / "big.img",
        64 << 30,
        [(5 << 30, random_bytes(3 * MiB, 3)), ((64 << 30) - MiB, b"end")],
    )
    store = tmp_path / "store"
    rc, out, err = sledge(
        capsys, "image", "import", str(src), "--name", "big", "--store", str(store), "--json"
    )
    assert rc == 0, err
    import json

    stats = json.loads(out.splitlines()[0])
    assert stats["image_size"] == 64 << 30
    assert stats["data_chunks"] == 2  # 3 MiB inside one 4 MiB chunk, plus the last one
    assert stats["bytes_read"] == 8 * MiB  # holes were never read
    dest = tmp_path / "out.img"
    assert sledge(capsys, "image", "export", "big", str(dest), "--store", str(store))[0] == 0
    assert allocated(dest) <= 16 * MiB
    with open(dest, "rb") as f:
        f.seek(5 << 30)
        assert f.read(3 * MiB) == random_bytes(3 * MiB, 3)
        f.seek((64 << 30) - MiB)
        assert f.read(4) == b"end\0"


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx"])
def test_qemu_formats_import_through_nbd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    need("qemu-img")
    raw = half_sparse_image(tmp_path / "src.raw", 20 * MiB + 4096)
    converted = tmp_path / f"src.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(converted)], check=True)
    store = tmp_path / "store"
    digest = imported(capsys, store, converted, "q", "--version", fmt)
    assert WritableStore(store).manifest(digest).meta.source_format == fmt
    dest = tmp_path / "out.raw"
    assert sledge(capsys, "image", "export", f"q:{fmt}", str(dest), "--store", str(store))[0] == 0
    assert filecmp.cmp(raw, dest, shallow=False)
    # same content as the raw import: same chunks, nothing new stored
    before = sorted(p.name for p in (store / "chunks").rglob("*") if p.is_file())
    imported(capsys, store, raw, "q", "--version", "raw")
    after = sorted(p.name for p in (store / "chunks").rglob("*") if p.is_file())
    assert before == after


def test_corrupt_chunk_found_by_verify_and_refused_by_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = random_image(tmp_path / "src.img", 6 * MiB)
    store = tmp_path / "store"
    digest = imported(capsys, store, src, "c", "--version", "1", "--chunk-size", "1M")
    m = WritableStore(store).manifest(digest)
    victim = store / layout.chunk_path(m.chunk(3).hex)
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x01
    victim.write_bytes(bytes(data))
    rc, out, _ = sledge(capsys, "image", "verify", "--store", str(store))
    assert rc == 1
    assert f"BAD {victim}" in out and "blake3 mismatch" in out
    assert "1 bad chunks" in out
    dest = tmp_path / "out.img"
    dest.write_bytes(b"previous content")
    rc, _, err = sledge(capsys, "image", "export", "c:1", str(dest), "--store", str(store))
    assert rc == 1
    assert "chunk 3" in err and m.chunk(3).hex in err
    assert dest.read_bytes() == b"previous content"  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.img")] == []
    victim.unlink()
    rc, out, _ = sledge(capsys, "image", "verify", "--store", str(store))
    assert rc == 1 and "missing" in out


def test_killed_import_leaves_a_clean_store_and_reimport_completes(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", 160 * MiB, seed=11)
    store = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "controller.cli",
        "image",
        "import",
        str(src),
        "--name",
        "k",
        "--version",
        "1",
        "--chunk-size",
        "1M",
        "--store",
        str(store),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Let the import run in slices of a few milliseconds, stopped in between, until it has stored
    # 10 chunks: polling a free-running import raced it (on a busy machine it could finish, or not
    # start, before the poll looked), so the kill landed after the end or before the first chunk.
    deadline = time.monotonic() + 120
    stored = 0
    proc.send_signal(signal.SIGSTOP)
    while stored < 10 and time.monotonic() < deadline and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)
        chunks = list((store / "chunks").rglob("*")) if (store / "chunks").exists() else []
        stored = sum(1 for c in chunks if c.is_file())
    assert proc.poll() is None, "the import ended before it could be killed mid-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = WritableStore(store)
    assert s.catalog() == []  # nothing tagged from a half import
    stored_before = [p for p in (store / "chunks").rglob("*") if p.is_file()]
    assert 10 <= len(stored_before) < 160
    report = s.verify()
    assert report.ok
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{160 - len(stored_before)} new chunks" in proc.stdout or len(stored_before) == 0
    assert s.verify().ok
    dest = tmp_path / "out.img"
    assert main(["image", "export", "k:1", str(dest), "--store", str(store)]) == 0
    assert filecmp.cmp(src, dest, shallow=False)


def test_rm_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = random_image(tmp_path / "a.img", 3 * MiB, seed=1)
    b = write_image(tmp_path / "b.img", 3 * MiB, [(0, random_bytes(MiB, 1)), (MiB, random_bytes(MiB, 99))])
    store = tmp_path / "store"
    imported(capsys, store, a, "a", "--version", "1", "--chunk-size", "1M")
    imported(capsys, store, b, "b", "--version", "1", "--chunk-size", "1M")
    (store / "tmp" / "leftover.1234").write_bytes(b"x" * 100)
    assert sledge(capsys, "image", "rm", "a:1", "--store", str(store))[0] == 0
    rc, out, _ = sledge(capsys, "image", "prune", "--store", str(store))
    assert rc == 0 and "pruned 3 files" in out  # a's 2 unshared chunks + the temporary
    rc, out, _ = sledge(capsys, "image", "list", "--store", str(store), "--json")
    assert '"b"' in out and '"a"' not in out
    assert WritableStore(store).verify().ok
    dest = tmp_path / "b.out"
    assert sledge(capsys, "image", "export", "b", str(dest), "--store", str(store))[0] == 0
    assert filecmp.cmp(b, dest, shallow=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "/nonexistent/x.img", "--name", "n"], "/nonexistent/x.img"),
        (["import", "{src}", "--name", "../etc"], "image name '../etc'"),
        (["import", "{src}", "--name", "ok", "--version", "a/b"], "image version 'a/b'"),
        (["show", "nothere"], "image 'nothere': not in the catalog"),
        (["export", "nothere:1", "{tmp}/x"], "not in the catalog"),
    ],
)
def test_bad_requests_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    src = random_image(tmp_path / "src.img", MiB)
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    rc, _, err = sledge(capsys, "image", *args, "--store", str(tmp_path / "store"))
    assert rc == 1
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_chunk_size_argument_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = random_image(tmp_path / "src.img", MiB)
    with pytest.raises(SystemExit):
        main(["image", "import", str(src), "--name", "n", "--chunk-size", "3M"])
    assert "power of two" in capsys.readouterr().err


@pytest.mark.root
def test_block_device_import_and_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loop_device
) -> None:  # type: ignore[no-untyped-def]
    src_dev = loop_device(8 * MiB)
    payload = random_bytes(8 * MiB, 5)
    with open(src_dev, "r+b") as f:
        f.write(payload)
    store = tmp_path / "store"
    imported(capsys, store, Path(src_dev), "dev", "--version", "1", "--chunk-size", "1M")
    dest_dev = loop_device(10 * MiB)
    with open(dest_dev, "r+b") as f:
        f.write(b"\xff" * 10 * MiB)
    rc, _, err = sledge(capsys, "image", "export", "dev:1", dest_dev, "--store", str(store))
    assert rc == 0, err
    with open(dest_dev, "rb") as f:
        assert f.read(8 * MiB) == payload
        assert f.read() == b"\xff" * 2 * MiB  # past the image: untouched
    small = loop_device(4 * MiB)
    rc, _, err = sledge(capsys, "image", "export", "dev:1", small, "--store", str(store))
    assert rc == 1 and f"image needs {8 * MiB} bytes, device has {4 * MiB}" in err
