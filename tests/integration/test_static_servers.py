"""`sledge-agent write` through every common static web server, started from its Debian package
on 127.0.0.1 (scripts/webservers.py): HTTP/1.0 and 1.1, keep-alive and `Connection: close`,
sized and chunked bodies, with and without Range, directly and through a caching proxy."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from agent.image import layout
from agent.image.manifest import Manifest
from agent.writer.sources import HttpSource, Timeouts
from tests.images import MiB, write_image
from tests.stores import import_store
from tests.tools import need

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from webservers import SERVERS, Traits, probe

H10, H11 = 10, 11
# What each server answers (checked against the real server below): together they cover
# both versions, keep-alive and close, sized and chunked bodies, with and without Range.
EXPECTED = {
    "nginx": Traits(H11, keep_alive=True, chunked=False, ranges=True),
    "nginx-close": Traits(H11, keep_alive=False, chunked=False, ranges=False),
    "apache2": Traits(H11, keep_alive=True, chunked=False, ranges=True),
    "apache2-close": Traits(H11, keep_alive=False, chunked=False, ranges=True),
    "lighttpd": Traits(H11, keep_alive=True, chunked=False, ranges=True),
    "caddy": Traits(H11, keep_alive=True, chunked=False, ranges=True),
    "busybox-httpd": Traits(H11, keep_alive=False, chunked=False, ranges=True),
    "python-http.server": Traits(H10, keep_alive=False, chunked=False, ranges=False),
    "python-http.server-1.1": Traits(H11, keep_alive=True, chunked=False, ranges=False),
    "nginx-proxy_cache": Traits(H11, keep_alive=True, chunked=False, ranges=False),
    "caddy-proxy-chunked": Traits(H11, keep_alive=True, chunked=True, ranges=True),
}


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[Path, Manifest, str, bytes]]:
    """One image (random, zero and compressible chunks) in a store every server may read: Apache's
    workers run as nobody when the test is root, so the tree is world-readable outside pytest's
    private tmp directory."""
    top = Path(tempfile.mkdtemp(prefix="sledge-www-"))
    try:
        top.chmod(0o755)
        text = b"sledge " * (MiB // 7 + 1)
        stripes = [(0, os.urandom(3 * MiB)), (5 * MiB, text[: 2 * MiB]), (9 * MiB, os.urandom(MiB + 512))]
        src = write_image(top / "src.img", 12 * MiB + 4096, stripes)
        root, manifest, digest = import_store(top / "store", src)
        for d, _, files in os.walk(top):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        yield root, manifest, digest, src.read_bytes()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _data_chunk(manifest: Manifest) -> str:
    return "/" + layout.chunk_path(next(c.hex for c in manifest.data_chunks()))


def _write(url: str, digest: str, dest: Path | str) -> int:
    return agent_main(["write", "--manifest", f"{url}/manifests/{digest}", "--device", str(dest)])


@pytest.mark.parametrize("name", list(SERVERS))
def test_the_agent_writes_the_image_through(
    name: str, store: tuple[Path, Manifest, str, bytes], tmp_path: Path
) -> None:
    factory, tools, _ = SERVERS[name]
    need(*tools)
    root, manifest, digest, data = store
    with factory(root, tmp_path / "server") as server:
        assert probe(server.url, _data_chunk(manifest)) == EXPECTED[name]
        dest = tmp_path / "out.img"
        assert _write(server.url, digest, dest) == 0
        assert dest.read_bytes() == data


def test_the_matrix_covers_every_kind_of_answer() -> None:
    for trait, values in (("version", {H10, H11}), ("keep_alive", {True, False})):
        assert {getattr(t, trait) for t in EXPECTED.values()} == values, trait
    for trait in ("chunked", "ranges"):
        assert {getattr(t, trait) for t in EXPECTED.values()} == {True, False}, trait
    assert set(EXPECTED) == set(SERVERS)


def test_every_chunk_from_one_connection_close_source(
    store: tuple[Path, Manifest, str, bytes], tmp_path: Path
) -> None:
    """The regression: http.client closes a `Connection: close` socket itself when the body ends;
    the source then touched the closed socket ([Errno 9] Bad file descriptor on every chunk)."""
    root, manifest, _, _ = store
    factory = SERVERS["python-http.server"][0]
    with factory(root, tmp_path / "server") as server:
        source = HttpSource(server.url, Timeouts(connect=2.0, stall=2.0))
        try:
            data = [c for c in manifest.data_chunks()]
            buf = memoryview(bytearray(max(c.stored_len for c in data)))
            for chunk in data:  # one thread: every chunk after the first on a fresh connection
                assert source.fetch_into(chunk, buf) == chunk.stored_len
                assert (root / layout.chunk_path(chunk.hex)).read_bytes() == buf[: chunk.stored_len]
        finally:
            source.close()


def test_a_caching_proxy_serves_the_second_write_without_the_origin(
    store: tuple[Path, Manifest, str, bytes], tmp_path: Path
) -> None:
    need("nginx")
    root, manifest, digest, data = store
    stored = {c.hex for c in manifest.data_chunks()}
    with SERVERS["nginx-proxy_cache"][0](root, tmp_path / "server") as server:
        assert _write(server.url, digest, tmp_path / "a.img") == 0
        first = server.output(0).count("GET /chunks/")
        assert first == len(stored), server.output(0)
        assert _write(server.url, digest, tmp_path / "b.img") == 0
        assert server.output(0).count("GET /chunks/") == first  # the origin saw no chunk again
    assert (tmp_path / "b.img").read_bytes() == data


@pytest.mark.root
def test_a_loop_device_through_an_http10_server(
    store: tuple[Path, Manifest, str, bytes], tmp_path: Path, loop_device: Callable[..., str]
) -> None:
    root, manifest, digest, data = store
    dev = loop_device(manifest.image_size + MiB)
    with SERVERS["python-http.server"][0](root, tmp_path / "server") as server:
        assert _write(server.url, digest, dev) == 0
    with open(dev, "rb") as f:
        assert f.read(len(data)) == data
