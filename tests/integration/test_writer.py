"""The writer against real stores, a scripted HTTP server and files (loop devices in test_writer_device)."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import blake3
import pytest

from agent.cli import main as agent_main
from agent.image import layout
from agent.image.manifest import ChunkKind, Manifest
from agent.writer.device import open_target
from agent.writer.errors import BadManifest, Cancelled, ChunkUnavailable, ManifestUnavailable
from agent.writer.events import Event, Progress, SourceFailed, WriteReport
from agent.writer.fetch import RetryPolicy
from agent.writer.health import HealthPolicy
from agent.writer.load import load_manifest
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.sources import ChunkSource, DirectorySource, HttpSource, Timeouts
from tests.chunkserver import FAULTS, serve
from tests.images import MiB, half_sparse_image, random_bytes, write_image
from tests.stores import import_store

FAST = WriteOptions(workers=3, retry=RetryPolicy(retries=2, backoff=0.01, max_bad=3))
TIMEOUTS = Timeouts(connect=2.0, stall=0.5, min_rate=4 << 20)


def make_store(
    tmp_path: Path, src: Path, name: str = "img", version: str = "1"
) -> tuple[Path, Manifest, str]:
    return import_store(tmp_path / "store", src, name, version)


def write(
    manifest: Manifest,
    digest: str,
    sources: list[ChunkSource],
    dest: Path | str,
    options: WriteOptions = FAST,
    events: list[Event] | None = None,
    cancel: threading.Event | None = None,
) -> WriteReport:
    target = open_target(str(dest), manifest.image_size)
    try:
        return Writer(
            manifest, digest, sources, target, options, events.append if events is not None else None, cancel
        ).run()
    finally:
        target.close()
        for s in sources:
            s.close()


def regions_old_or_new(dest: Path, old: bytes, new: bytes, chunk_size: int) -> list[str]:
    """Every chunk-sized region holds the old bytes or the new ones: list the ones that do not."""
    data = dest.read_bytes()
    bad = []
    for off in range(0, len(new), chunk_size):
        region = data[off : off + chunk_size]
        if region not in (old[off : off + chunk_size], new[off : off + chunk_size]):
            bad.append(f"region at {off}")
    return bad


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    src = half_sparse_image(tmp_path / "src.img", 12 * MiB + 4096, stripe=MiB)
    return src, src.read_bytes()


def test_fresh_file_from_directory_source_is_identical_and_sparse(
    tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    src, data = image
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    report = write(manifest, digest, [DirectorySource(str(root))], dest)
    assert dest.read_bytes() == data
    zero_chunks = sum(1 for c in manifest if c.kind is ChunkKind.ZERO)
    assert report.chunks_skipped == zero_chunks > 0  # a fresh file already reads as zeros
    assert os.stat(dest).st_blocks * 512 < len(data)
    assert report.chunks_fetched == len(manifest) - zero_chunks


def test_second_write_moves_nothing_and_v2_moves_only_changed_chunks(
    tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    src, data = image
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    with serve(root) as server:
        write(manifest, digest, [HttpSource(server.url, TIMEOUTS)], dest)
        first = sum(server.requests.values())
        report = write(manifest, digest, [HttpSource(server.url, TIMEOUTS)], dest)
        assert report.fetched_bytes == 0 and sum(server.requests.values()) == first
        assert report.chunks_inplace == len(manifest) - report.chunks_zero
        # v2: change two chunks
        v2 = bytearray(data)
        v2[3 * MiB : 3 * MiB + 100] = random_bytes(100, 42)
        v2[9 * MiB + 5] ^= 1
        src2 = write_image(tmp_path / "v2.img", len(v2), [(0, bytes(v2))])
        _, m2, d2 = make_store(tmp_path, src2, version="2")
        server.requests.clear()
        report = write(m2, d2, [HttpSource(server.url, TIMEOUTS)], dest)
        assert dest.read_bytes() == bytes(v2)
        assert report.chunks_fetched == 2
        changed = {m2.chunk(3).hex, m2.chunk(9).hex}
        assert set(server.requests) == changed
        assert report.fetched_bytes == m2.chunk(3).stored_len + m2.chunk(9).stored_len


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_fails_over_and_nothing_unverified_is_written(
    tmp_path: Path, image: tuple[Path, bytes], fault: str
) -> None:
    src, data = image
    root, manifest, digest = make_store(tmp_path, src)
    victim = list(manifest.data_chunks())[-1]
    dest = tmp_path / "out.img"
    events: list[Event] = []
    with serve(root) as bad, serve(root) as good:
        bad.always[victim.hex] = fault
        # One thread, no ordering by speed: both sources have answered (the first chunk from the
        # first, the second from the second, unproven) and the victim, last, goes to the first.
        report = write(
            manifest,
            digest,
            [HttpSource(bad.url, TIMEOUTS), HttpSource(good.url, TIMEOUTS)],
            dest,
            WriteOptions(workers=1, retry=dataclasses.replace(FAST.retry, health=HealthPolicy(slow_ratio=0))),
            events=events,
        )
        assert dest.read_bytes() == data
        failures = [e for e in events if isinstance(e, SourceFailed)]
        assert failures and all(e.source == bad.url and e.chunk_index == victim.index for e in failures)
        assert good.requests[victim.hex] == 1
        others = [c for c in manifest.data_chunks() if good.requests[c.hex] and c.hex != victim.hex]
        assert len(others) == 1  # its first answer, while unproven
        assert report.bytes_by_source[good.url] == victim.stored_len + others[0].stored_len


@pytest.mark.parametrize("fault", ["flip", "truncate", "500", "close", "other", "stall"])
def test_chunk_no_source_can_serve_fails_naming_it_and_leaves_old_or_new(
    tmp_path: Path, image: tuple[Path, bytes], fault: str
) -> None:
    src, data = image
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    old = random_bytes(len(data), 99)
    dest.write_bytes(old)
    victim = manifest.chunk(4)
    assert victim.kind is ChunkKind.DATA
    with serve(root) as a, serve(root) as b:
        a.always[victim.hex] = fault
        b.always[victim.hex] = "404"
        with pytest.raises(ChunkUnavailable) as info:
            write(manifest, digest, [HttpSource(a.url, TIMEOUTS), HttpSource(b.url, TIMEOUTS)], dest)
    message = str(info.value)
    assert f"chunk 4 (offset {4 * MiB}, blake3 {victim.hex})" in message
    assert a.url in message and b.url in message and "404" in message
    assert regions_old_or_new(dest, old, data, MiB) == []
    assert dest.read_bytes()[4 * MiB : 5 * MiB] == old[4 * MiB : 5 * MiB]


def test_source_serving_bad_bytes_is_dropped(tmp_path: Path) -> None:
    src = write_image(tmp_path / "r.img", 16 * MiB, [(0, random_bytes(16 * MiB, 3))])
    data = src.read_bytes()
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    events: list[Event] = []
    with serve(root) as liar, serve(root) as good:
        liar.always["*"] = "flip"
        opts = WriteOptions(workers=1, retry=RetryPolicy(retries=2, backoff=0.01, max_bad=3))
        report = write(
            manifest,
            digest,
            [HttpSource(liar.url, TIMEOUTS), HttpSource(good.url, TIMEOUTS)],
            dest,
            opts,
            events,
        )
        assert dest.read_bytes() == data
        assert report.dropped_sources == (liar.url,)
        assert sum(liar.requests.values()) == 3  # then never asked again
        assert any(isinstance(e, SourceFailed) and e.dropped for e in events)


def test_404_on_primary_is_not_fatal(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    src, data = image
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    with serve(root) as primary, serve(root) as mirror:
        primary.always["*"] = "404"
        report = write(
            manifest, digest, [HttpSource(primary.url, TIMEOUTS), HttpSource(mirror.url, TIMEOUTS)], dest
        )
    assert dest.read_bytes() == data
    assert report.dropped_sources == ()  # a 404 is not held against a source


def test_manifest_is_checked_against_its_digest_before_use(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    src, _ = image
    root, _, digest = make_store(tmp_path, src)
    other = "0" * 64
    (root / "manifests" / other).write_bytes((root / "manifests" / digest).read_bytes())
    with serve(root) as server:
        with pytest.raises(ManifestUnavailable, match=f"expected blake3 {other}"):
            load_manifest(f"{server.url}/manifests/{other}", [], TIMEOUTS)
        with pytest.raises(BadManifest, match=f"no source has it.*expected blake3 {other}"):
            load_manifest(other, [HttpSource(server.url, TIMEOUTS)], TIMEOUTS)
        with pytest.raises(ManifestUnavailable, match=r"no source has it.*HTTP 404"):
            load_manifest("1" * 64, [HttpSource(server.url, TIMEOUTS)], TIMEOUTS)
        # a bad source is passed over for a good one
        good = load_manifest(
            digest, [HttpSource(server.url + "/nothing", TIMEOUTS), HttpSource(server.url, TIMEOUTS)]
        )
        assert good.digest == digest
        loaded = load_manifest(f"{server.url}/manifests/{digest}", [], TIMEOUTS)
        assert loaded.pinned and loaded.digest == digest and loaded.default_source == server.url
        (root / "manifests" / "garbage").write_bytes(b"\x85garbage")
        with pytest.raises(ManifestUnavailable, match="manifest field"):
            load_manifest(f"{server.url}/manifests/garbage", [], TIMEOUTS)


def test_cli_refuses_a_tampered_manifest_before_touching_the_target(
    tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    src, _ = image
    root, _, digest = make_store(tmp_path, src)
    raw = bytearray((root / "manifests" / digest).read_bytes())
    raw[-1] ^= 1
    (root / "manifests" / digest).write_bytes(bytes(raw))
    dest = tmp_path / "out.img"
    dest.write_bytes(b"keep me")
    with serve(root) as server:
        rc = agent_main(["write", "--manifest", f"{server.url}/manifests/{digest}", "--device", str(dest)])
    assert rc == 1
    assert dest.read_bytes() == b"keep me"


def test_cli_write_and_verify(
    tmp_path: Path, image: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    src, data = image
    root, _, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    with serve(root) as server:
        rc = agent_main(
            [
                "write",
                "--manifest",
                f"{server.url}/manifests/{digest}",
                "--source",
                server.url,
                "--device",
                str(dest),
                "--verify",
            ]
        )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verified" in out and "fetched" in out
    assert dest.read_bytes() == data
    # a local store directory works as a source too, with the manifest by path
    dest2 = tmp_path / "out2.img"
    rc = agent_main(["write", "--manifest", str(root / "manifests" / digest), "--device", str(dest2)])
    assert rc == 0 and dest2.read_bytes() == data


def test_verify_names_a_region_changed_behind_the_writer(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    from agent.writer.errors import VerifyFailed

    src, _ = image
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    write(manifest, digest, [DirectorySource(str(root))], dest)
    with open(dest, "r+b") as f:
        f.seek(6 * MiB + 123)
        f.write(b"tampered")
    target = open_target(str(dest), manifest.image_size)
    try:
        writer = Writer(manifest, digest, [DirectorySource(str(root))], target, FAST)
        with pytest.raises(VerifyFailed, match=r"1 chunks differ from the image: 6@6291456"):
            writer.verify()
    finally:
        target.close()


def test_cancel_stops_at_a_chunk_boundary(tmp_path: Path) -> None:
    src = write_image(tmp_path / "r.img", 24 * MiB, [(0, random_bytes(24 * MiB, 8))])
    data = src.read_bytes()
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    old = bytes(len(data))
    cancel = threading.Event()
    seen: list[Event] = []

    def listener(event: Event) -> None:
        seen.append(event)
        if isinstance(event, Progress) and event.chunks_fetched >= 2:
            cancel.set()

    with serve(root) as server:
        server.delay = 0.05
        target = open_target(str(dest), manifest.image_size)
        opts = WriteOptions(workers=2, progress_interval=0.0)
        try:
            with pytest.raises(Cancelled):
                Writer(
                    manifest, digest, [HttpSource(server.url, TIMEOUTS)], target, opts, listener, cancel
                ).run()
        finally:
            target.close()
        fetched = sum(server.requests.values())
    assert 2 <= fetched < len(manifest)
    assert regions_old_or_new(dest, old, data, MiB) == []


def test_progress_events_add_up(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    src, _ = image
    root, manifest, digest = make_store(tmp_path, src)
    events: list[Event] = []
    report = write(manifest, digest, [DirectorySource(str(root))], tmp_path / "o.img", events=events)
    last = [e for e in events if isinstance(e, Progress)][-1]
    assert last.done_bytes == manifest.image_size
    assert last.chunks_total == len(manifest)
    assert report.image_size == manifest.image_size
    assert (
        blake3.blake3((tmp_path / "o.img").read_bytes()).digest() == blake3.blake3(src.read_bytes()).digest()
    )
    assert layout.chunk_path(manifest.chunk(0).hex).startswith("chunks/")


def test_cli_verify_reports_drift_and_writes_nothing(
    tmp_path: Path, image: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = image
    root, manifest, digest = make_store(tmp_path, src)
    dest = tmp_path / "out.img"
    write(manifest, digest, [DirectorySource(str(root))], dest)
    mpath = str(root / "manifests" / digest)
    assert agent_main(["verify", "--manifest", mpath, "--device", str(dest)]) == 0
    assert "chunks match" in capsys.readouterr().out
    with open(dest, "r+b") as f:
        f.seek(2 * MiB + 7)
        f.write(b"drift")
        f.seek(11 * MiB)
        f.write(b"more drift")
    before = dest.read_bytes()
    assert agent_main(["verify", "--manifest", mpath, "--device", str(dest)]) == 1
    out = capsys.readouterr()
    assert (
        f"differs: chunk 2 offset {2 * MiB}" in out.out and f"differs: chunk 11 offset {11 * MiB}" in out.out
    )
    assert "does not hold the image" in out.err
    assert dest.read_bytes() == before  # verify writes nothing
    assert agent_main(["verify", "--manifest", mpath, "--device", str(tmp_path / "missing")]) == 2
