"""Object storage as the chunk store, against a real S3 API on 127.0.0.1 (moto's server mode):
`sledge image publish` / `pull`, an interrupted publish, a bucket missing a chunk, and
`sledge serve --s3-store` redirecting a real `sledge-agent write` to presigned URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.image import layout
from agent.image.manifest import Manifest
from controller.cli import main as sledge_main
from controller.images import s3
from controller.images.store import WritableStore
from tests.images import MiB, write_image
from tests.s3server import FAKE_ENV, MotoServer, without_aws
from tests.stores import import_store

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from webservers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(moto: MotoServer, aws_env: None, request: pytest.FixtureRequest) -> tuple[Any, s3.S3Location]:
    """A fresh bucket per test (named after it), its store under a prefix."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    client = s3.client(moto.url)
    client.create_bucket(Bucket=name)
    return client, s3.S3Location(name, "fleet/store")


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Manifest, str, bytes]:
    """A store holding img:1: random, compressible and zero chunks (1 MiB chunks)."""
    text = b"object storage " * (MiB // 15 + 1)
    stripes = [(0, os.urandom(4 * MiB)), (6 * MiB, text[: 2 * MiB]), (10 * MiB, os.urandom(MiB + 100))]
    src = write_image(tmp_path / "src.img", 12 * MiB, stripes)
    root, manifest, digest = import_store(tmp_path / "store", src)
    return root, manifest, digest, src.read_bytes()


def sledge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = sledge_main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def keys(client: Any, loc: s3.S3Location) -> set[str]:
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix + "/"):
        found |= {o["Key"].removeprefix(loc.prefix + "/") for o in page.get("Contents", [])}
    return found


def layout_of(manifest: Manifest, digest: str) -> set[str]:
    chunks = {layout.chunk_path(c.hex) for c in manifest.data_chunks()}
    return chunks | {layout.manifest_path(digest), layout.catalog_path("img", "1")}


class Recording:
    """The real client, with the keys it PUTs recorded in order."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.puts: list[str] = []

    def put_object(self, **kw: Any) -> Any:
        self.puts.append(kw["Key"])
        return self.client.put_object(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_publish_uploads_the_store_layout_with_the_manifest_last(
    bucket: tuple[Any, s3.S3Location], image: tuple[Path, Manifest, str, bytes]
) -> None:
    client, loc = bucket
    root, manifest, digest, _ = image
    rec = Recording(client)
    result = s3.publish(WritableStore(root), "img:1", loc, rec, workers=4)
    assert keys(client, loc) == layout_of(manifest, digest)
    chunk_keys = {loc.key(layout.chunk_path(c.hex)) for c in manifest.data_chunks()}
    assert set(rec.puts[:-2]) == chunk_keys
    assert rec.puts[-2:] == [loc.key(layout.manifest_path(digest)), loc.key(layout.catalog_path("img", "1"))]
    assert (result.chunks, result.moved) == (len(chunk_keys), len(chunk_keys))
    for c in manifest.data_chunks():  # the bytes are the store's, byte for byte
        body = client.get_object(Bucket=loc.bucket, Key=loc.key(layout.chunk_path(c.hex)))["Body"].read()
        assert body == (root / layout.chunk_path(c.hex)).read_bytes()
    again = s3.publish(WritableStore(root), "img:1", loc, client)
    assert (again.moved, again.moved_bytes) == (0, 0)


def test_an_interrupted_publish_is_completed_by_the_next_with_only_the_missing_chunks(
    bucket: tuple[Any, s3.S3Location],
    image: tuple[Path, Manifest, str, bytes],
    capsys: pytest.CaptureFixture[str],
    moto: MotoServer,
) -> None:
    client, loc = bucket
    root, manifest, digest, _ = image
    total = len({c.hex for c in manifest.data_chunks()})
    uploads = 0

    def ctrl_c_after_two(n: int) -> None:
        nonlocal uploads
        uploads += 1
        if uploads == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s3.publish(WritableStore(root), "img:1", loc, client, workers=1, progress=ctrl_c_after_two)
    first = keys(client, loc)
    assert layout.manifest_path(digest) not in first  # no reader can see the image yet
    assert layout.catalog_path("img", "1") not in first
    assert 2 <= len(first) < total, first

    rc, out, err = sledge(
        capsys, "image", "publish", "img:1", str(loc), "--store", str(root), "--endpoint-url", moto.url
    )
    assert rc == 0, err
    assert f"{total - len(first)} of {total} chunks uploaded" in out, out
    assert keys(client, loc) == layout_of(manifest, digest)


def test_pull_into_an_empty_store_then_nothing_to_pull(
    bucket: tuple[Any, s3.S3Location],
    image: tuple[Path, Manifest, str, bytes],
    capsys: pytest.CaptureFixture[str],
    moto: MotoServer,
    tmp_path: Path,
) -> None:
    client, loc = bucket
    root, _, digest, data = image
    s3.publish(WritableStore(root), "img:1", loc, client)
    local = tmp_path / "pulled"
    pull = ["image", "pull", str(loc), "img", "--store", str(local), "--endpoint-url", moto.url]
    rc, out, err = sledge(capsys, *pull)  # NAME alone: the newest version in the bucket
    assert rc == 0, err
    assert out.splitlines()[-1] == digest
    rc, out, err = sledge(
        capsys, "image", "export", "img:1", str(tmp_path / "out.img"), "--store", str(local)
    )
    assert rc == 0, err
    assert (tmp_path / "out.img").read_bytes() == data
    rc, out, err = sledge(capsys, *pull)
    assert rc == 0 and " 0 of " in out, out + err
    bare = tmp_path / "manifest-only"  # what a controller serving from the bucket keeps
    rc, out, err = sledge(
        capsys, *pull[:-4], "--store", str(bare), "--endpoint-url", moto.url, "--manifest-only"
    )
    assert rc == 0, err
    assert WritableStore(bare).resolve("img:1").digest == digest
    assert not any(p.is_file() for p in (bare / "chunks").rglob("*"))


def test_a_bucket_missing_a_chunk_is_named_and_leaves_no_manifest(
    bucket: tuple[Any, s3.S3Location],
    image: tuple[Path, Manifest, str, bytes],
    capsys: pytest.CaptureFixture[str],
    moto: MotoServer,
    tmp_path: Path,
) -> None:
    client, loc = bucket
    root, manifest, digest, _ = image
    s3.publish(WritableStore(root), "img:1", loc, client)
    lost = list(manifest.data_chunks())[2]
    client.delete_object(Bucket=loc.bucket, Key=loc.key(layout.chunk_path(lost.hex)))
    local = tmp_path / "pulled"
    rc, _, err = sledge(
        capsys, "image", "pull", str(loc), "img:1", "--store", str(local), "--endpoint-url", moto.url
    )
    assert rc == 1
    assert lost.hex in err and "missing from the bucket" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one clear line, no traceback
    assert not (local / layout.manifest_path(digest)).exists()  # nothing names chunks we lack
    assert not (local / layout.catalog_path("img", "1")).exists()


def test_a_damaged_chunk_in_the_bucket_is_refused_on_pull(
    bucket: tuple[Any, s3.S3Location], image: tuple[Path, Manifest, str, bytes], tmp_path: Path
) -> None:
    client, loc = bucket
    root, manifest, _, _ = image
    s3.publish(WritableStore(root), "img:1", loc, client)
    bad = next(iter(manifest.data_chunks()))
    key = loc.key(layout.chunk_path(bad.hex))
    body = bytearray(client.get_object(Bucket=loc.bucket, Key=key)["Body"].read())
    body[100] ^= 1
    client.put_object(Bucket=loc.bucket, Key=key, Body=bytes(body))
    local = WritableStore(tmp_path / "pulled")
    with pytest.raises(s3.S3Error, match=key):
        s3.pull(loc, "img:1", local, client)
    assert local.stored_size(bad.hex) is None


def test_the_controller_redirects_an_agent_without_credentials_to_presigned_urls(
    bucket: tuple[Any, s3.S3Location],
    image: tuple[Path, Manifest, str, bytes],
    moto: MotoServer,
    tmp_path: Path,
) -> None:
    client, loc = bucket
    root, manifest, digest, data = image
    s3.publish(WritableStore(root), "img:1", loc, client)
    port = free_port()
    argv = [sys.executable, "-m", "controller.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data", str(tmp_path / "data"), "--s3-store", str(loc), "--s3-endpoint-url", moto.url]
    argv += ["--presign-seconds", "120"]
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(base, serve, tmp_path / "serve.log")
        chunk = next(iter(manifest.data_chunks()))
        location = _redirect_of(f"{base}/v1/store/{layout.chunk_path(chunk.hex)}")
        assert location.startswith(f"{moto.url}/{loc.bucket}/{loc.key(layout.chunk_path(chunk.hex))}?")
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=120" in location
        with pytest.raises(urllib.error.HTTPError) as unsigned:  # the bucket is not public
            urllib.request.urlopen(location.partition("?")[0], timeout=5)
        assert unsigned.value.code == 403
        agent = [
            sys.executable,
            "-m",
            "agent.cli",
            "write",
            "--manifest",
            f"{base}/v1/store/manifests/{digest}",
        ]
        agent += ["--device", str(tmp_path / "out.img")]
        done = subprocess.run(
            agent, cwd=REPO, env=without_aws(dict(os.environ)), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out.img").read_bytes() == data
        assert not any((tmp_path / "data").rglob("chunks/*/*"))  # every byte came from the bucket
    finally:
        serve.terminate()
        serve.wait(10)


def _wait_up(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
    raise AssertionError(f"sledge serve did not come up: {log.read_text()}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


def _redirect_of(url: str) -> str:
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(url, timeout=5)
    assert info.value.code == 307
    assert info.value.headers["Cache-Control"] == "no-store"
    return str(info.value.headers["Location"])


def test_a_public_bucket_is_a_plain_http_mirror_and_a_missing_chunk_is_named(
    bucket: tuple[Any, s3.S3Location],
    image: tuple[Path, Manifest, str, bytes],
    moto: MotoServer,
    tmp_path: Path,
) -> None:
    """The bucket's own URL (path-style here) as `--source`: what `sledge serve --mirror` hands out."""
    client, loc = bucket
    root, manifest, digest, data = image
    s3.publish(WritableStore(root), "img:1", loc, client)
    policy = {  # anyone may read the store's objects (list nothing, write nothing)
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{loc.bucket}/{loc.prefix}/*",
            }
        ],
    }
    client.put_bucket_policy(Bucket=loc.bucket, Policy=json.dumps(policy))
    public = f"{moto.url}/{loc.bucket}/{loc.prefix}"
    agent = [sys.executable, "-m", "agent.cli", "write", "--manifest", digest, "--source", public]
    env = without_aws(dict(os.environ))
    done = subprocess.run(
        [*agent, "--device", str(tmp_path / "a.img")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.img").read_bytes() == data
    lost = list(manifest.data_chunks())[1]
    client.delete_object(Bucket=loc.bucket, Key=loc.key(layout.chunk_path(lost.hex)))
    done = subprocess.run(
        [*agent, "--device", str(tmp_path / "b.img"), "--retries", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert lost.hex in done.stderr.splitlines()[-1] and "404" in done.stderr, done.stderr


def test_a_missing_bucket_or_unreachable_endpoint_is_one_clear_line(
    image: tuple[Path, Manifest, str, bytes],
    capsys: pytest.CaptureFixture[str],
    moto: MotoServer,
    aws_env: None,
) -> None:
    root = image[0]
    rc, _, err = sledge(
        capsys,
        "image",
        "publish",
        "img:1",
        "s3://no-such-bucket/x",
        "--store",
        str(root),
        "--endpoint-url",
        moto.url,
    )
    assert rc == 1 and "s3://no-such-bucket/x" in err and "NoSuchBucket" in err, err
    assert len(err.strip().splitlines()) == 1, err
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc, _, err = sledge(
        capsys, "image", "pull", "s3://b1x/p", "img:1", "--store", str(root), "--endpoint-url", closed
    )
    assert rc == 1 and closed in err and len(err.strip().splitlines()) == 1, err
