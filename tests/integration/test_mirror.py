"""`sledge mirror-config` with real nginx (nginx-light) in front of a real `sledge serve` on 127.0.0.1:
the agent writes through the mirror, a second write is served from its cache (the controller's
sledge_served_bytes_total does not move), a corrupted cached chunk is refused by the agent, and
neither the catalog nor the API is reachable through the mirror."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from agent.image.manifest import Manifest
from agent.writer.events import Event, SourceFailed
from agent.writer.fetch import RetryPolicy
from agent.writer.health import HealthPolicy
from agent.writer.pipeline import WriteOptions
from agent.writer.sources import ChunkSource, HttpSource, Timeouts
from controller.cli import main as sledge_main
from tests.images import MiB, random_image
from tests.integration.test_controller_serve import Server, free_port
from tests.integration.test_writer import write
from tests.stores import import_store
from tests.tools import need

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from webservers import WebServer, nginx_mirror


def _served(controller: str) -> int:
    with urllib.request.urlopen(f"{controller}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r"^sledge_served_bytes_total (\d+)$", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))


def _status(url: str, path: str) -> int:
    host, _, port = url.removeprefix("http://").partition(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", path)
        resp = c.getresponse()
        resp.read()
        return resp.status
    finally:
        c.close()


@pytest.fixture
def rack(tmp_path: Path) -> Iterator[tuple[Server, WebServer, Manifest, str, bytes, Path]]:
    """A controller with one image, and nginx configured by `sledge mirror-config` in front of it."""
    need("nginx")
    src = random_image(tmp_path / "src.img", 16 * MiB, seed=7)
    _, manifest, digest = import_store(tmp_path / "data" / "store", src)
    server = Server(tmp_path / "data", free_port())
    server.start()
    work = tmp_path / "mirror"
    cache = work / "cache"
    port = free_port()
    flags = ["--listen", f"127.0.0.1:{port}", "--max-size", "1G", "--cache-dir", str(cache)]
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "mirror-config", "--controller", server.url, *flags],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    mirror = nginx_mirror(work, port, out.stdout, access_log=True)
    try:
        with mirror:
            yield server, mirror, manifest, digest, src.read_bytes(), cache
    finally:
        server.stop()


def _agent_write(base: str, digest: str, dest: Path) -> int:
    return agent_main(["write", "--manifest", f"{base}/manifests/{digest}", "--device", str(dest)])


def test_writes_through_the_mirror_reach_the_controller_once(
    rack: tuple[Server, WebServer, Manifest, str, bytes, Path], tmp_path: Path
) -> None:
    server, mirror, manifest, digest, data, _ = rack
    base = f"{mirror.url}/store"
    before = _served(server.url)
    assert _agent_write(base, digest, tmp_path / "a.img") == 0
    assert (tmp_path / "a.img").read_bytes() == data
    stored = sum(c.stored_len for c in manifest.data_chunks())
    first = _served(server.url) - before
    assert stored <= first <= stored + 64 * 1024  # every chunk once, and the manifest
    assert _agent_write(base, digest, tmp_path / "b.img") == 0
    assert (tmp_path / "b.img").read_bytes() == data
    assert _served(server.url) - before == first  # the second write came from the mirror's cache
    hits = (mirror.dir / "access.log").read_text()
    assert hits.count(" 200 ") >= 2 * len(list(manifest.data_chunks()))


def test_a_corrupted_cached_chunk_is_refused_and_fetched_from_the_controller(
    rack: tuple[Server, WebServer, Manifest, str, bytes, Path], tmp_path: Path
) -> None:
    server, mirror, manifest, digest, data, cache = rack
    base = f"{mirror.url}/store"
    assert _agent_write(base, digest, tmp_path / "a.img") == 0
    victim = list(manifest.data_chunks())[2]
    key = f"KEY: /store/chunks/{victim.hex[:2]}/{victim.hex}".encode()
    entries = [p for p in cache.rglob("*") if p.is_file() and key in p.read_bytes()]
    assert len(entries) == 1, entries
    blob = bytearray(entries[0].read_bytes())
    blob[-100] ^= 0x01  # the body is the entry's tail
    entries[0].write_bytes(bytes(blob))
    before = _served(server.url)
    events: list[Event] = []
    # One thread, no ordering by speed: chunk 0 from the mirror, chunk 1 from the controller (its
    # first answer), then the mirror first again: the victim is asked of the mirror.
    health = HealthPolicy(slow_ratio=0)
    options = WriteOptions(workers=1, retry=RetryPolicy(retries=2, backoff=0.01, health=health))
    timeouts = Timeouts(connect=2.0, stall=5.0)
    sources: list[ChunkSource] = [HttpSource(base, timeouts), HttpSource(f"{server.url}/v1/store", timeouts)]
    report = write(manifest, digest, sources, tmp_path / "b.img", options, events)
    assert (tmp_path / "b.img").read_bytes() == data
    refused = [e for e in events if isinstance(e, SourceFailed)]
    assert [(e.source, e.chunk_index) for e in refused] == [(base, victim.index)], refused
    assert "blake3" in refused[0].error or "digest" in refused[0].error, refused[0].error
    # from the controller: its first answer (chunk 1) and the refused chunk, nothing else
    from_controller = _served(server.url) - before
    assert from_controller == report.bytes_by_source[f"{server.url}/v1/store"]
    assert from_controller == victim.stored_len + list(manifest.data_chunks())[1].stored_len


def test_only_chunks_and_manifests_pass_the_mirror(
    rack: tuple[Server, WebServer, Manifest, str, bytes, Path],
) -> None:
    server, mirror, _, digest, _, _ = rack
    assert _status(server.url, "/v1/store/catalog/img/1") in (403, 404)
    for path in (
        "/store/catalog/img/1",
        "/v1/store/catalog/img/1",
        "/v1/machines",
        "/metrics",
        "/store/chunks/../catalog/img/1",
        f"/store/manifests/{digest}/../../catalog/img/1",
        f"/store/chunks/{digest[:2]}/{digest.upper()}",
        "/healthz",
    ):
        assert _status(mirror.url, path) == 404, path
    assert _status(mirror.url, f"/store/manifests/{digest}") == 200


@pytest.mark.parametrize(
    "args, message",
    [
        (["--controller", "http://ctl:8470/v1"], "without a path"),
        (["--controller", "http://ctl;evil:8470"], "--controller"),
        (["--store", "http://store/x;y/"], "plain path"),
        (["--store", "http://store/a?token=1"], "without credentials, query"),
        (["--listen", "nginx.example:80"], "IP address"),
        (["--cache-dir", "/var/cache/x y"], "--cache-dir"),
        (["--cache-dir", "relative"], "--cache-dir"),
    ],
)
def test_flags_that_would_break_or_bend_the_config_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sledge_main(["mirror-config", "--max-size", "10G", *args]) == 1
    err = capsys.readouterr().err
    assert message in err, err
