"""Object storage (S3, Ceph RGW, MinIO...) as a chunk store: publish, pull, presign.

A bucket prefix holds the same tree as a store directory (agent.image.layout): chunks/aa/HEX,
manifests/HEX, catalog/NAME/VERSION. Publishing uploads only the chunks the bucket lacks, then
the manifest, then the catalog entry: an object PUT is atomic, so a reader that finds a
manifest finds every chunk it names, and an interrupted publish leaves chunks a second one
skips. Pulling verifies every chunk against the manifest before it enters the local store.

boto3 is an optional extra (`sledge[s3]`), imported only here and only when a bucket is used:
the agent never needs it, and neither does a controller that keeps its store on disk.
Credentials come from boto3's usual sources (environment, ~/.aws, instance roles); a client
is passed in, so this module makes no decision about where they come from.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from agent.image import layout
from agent.image.chunk import ChunkInvalid, decode_stored
from agent.image.manifest import Chunk, Limits, Manifest, ManifestError, decode
from agent.image.store import LocalStore, StoreError
from controller.images.store import WritableStore

IMMUTABLE = "public, max-age=31536000, immutable"  # chunks and manifests never change
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's own limit


class S3Error(StoreError):
    """A bucket that cannot be reached, refuses us, or lacks or damages what an image needs."""


@dataclass(frozen=True)
class S3Location:
    """s3://BUCKET/PREFIX: where a store's tree starts in a bucket."""

    bucket: str
    prefix: str = ""  # no leading or trailing slash; "" is the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Location:
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if rest == url or not _BUCKET.fullmatch(bucket):
            raise S3Error(
                f"object store {url[:200]!r}: expected s3://BUCKET[/PREFIX] with a valid bucket name"
            )
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise S3Error(f"object store {url[:200]!r}: the prefix has an empty, '.' or '..' segment")
        return cls(bucket, prefix)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def client(endpoint_url: str = "", workers: int = 8) -> Any:
    """A boto3 S3 client; `endpoint_url` for anything that is not AWS (path-style addressing)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise S3Error("object storage needs boto3: pip install 'sledge[s3]'") from None
    if endpoint_url and not endpoint_url.startswith(("http://", "https://")):
        raise S3Error(f"--endpoint-url {endpoint_url[:200]!r}: expected an http(s) URL")
    config = Config(
        max_pool_connections=max(10, workers + 2),
        retries={"max_attempts": 3, "mode": "standard"},  # a dead endpoint is reported in seconds
        connect_timeout=10,
        s3={"addressing_style": "path"} if endpoint_url else {},
        signature_version="s3v4",
    )
    with boto_errors("object storage client"):
        return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)


@contextlib.contextmanager
def boto_errors(what: str) -> Iterator[None]:
    """botocore's errors (HTTP answers, no credentials, unreachable endpoint) as one S3Error."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise S3Error(f"{what}: {err.get('Code', '?')}: {err.get('Message', '') or exc}") from None
    except BotoCoreError as exc:
        raise S3Error(f"{what}: {exc}") from None


def _missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
        "NoSuchKey",
        "404",
        "NotFound",
    )


def listed_chunks(s3: Any, loc: S3Location, prefixes: set[str]) -> dict[str, int]:
    """Chunks the bucket holds under the given two-hex-digit directories: digest -> size.

    One listing per directory an image uses (at most 256), not a HEAD per chunk."""
    found: dict[str, int] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for prefix in sorted(prefixes):
        directory = loc.key(f"chunks/{prefix}/")
        with boto_errors(f"{loc}: listing {directory}"):
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=directory):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(directory) :]
                    if _HEX64.fullmatch(name):
                        found[name] = int(obj["Size"])
    return found


@dataclass(frozen=True)
class Transfer:
    """What a publish or pull moved."""

    digest: str
    name: str
    version: str
    chunks: int  # distinct data chunks the image names
    moved: int  # of those, uploaded or downloaded
    moved_bytes: int
    seconds: float


def publish(
    store: LocalStore,
    ref: str,
    dest: S3Location,
    s3: Any,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Transfer:
    """Upload image `ref` from `store`: the missing chunks, then the manifest, then the catalog."""
    start = time.monotonic()
    entry = store.resolve(ref)
    manifest = store.manifest(entry.digest)
    chunks = _distinct(manifest)
    present = listed_chunks(s3, dest, {c.hex[:2] for c in chunks})
    todo = [c for c in chunks if present.get(c.hex) != c.stored_len]

    def upload(chunk: Chunk) -> None:
        stored = store.read_stored(chunk)
        decode_stored(chunk, stored)  # never publish a chunk the store damaged (ChunkInvalid)
        key = dest.key(layout.chunk_path(chunk.hex))
        with boto_errors(f"{dest}: uploading {chunk.describe()}"):
            s3.put_object(
                Bucket=dest.bucket,
                Key=key,
                Body=stored,
                ContentType="application/octet-stream",
                CacheControl=IMMUTABLE,
            )
        if progress is not None:
            progress(len(stored))

    _run_all(upload, todo, workers)
    # Only now: a reader that sees the manifest finds every chunk it names.
    _put(s3, dest, layout.manifest_path(entry.digest), store.manifest_bytes(entry.digest), IMMUTABLE)
    if entry.name:
        catalog = f"{entry.digest}\n".encode()
        _put(s3, dest, layout.catalog_path(entry.name, entry.version), catalog, "no-cache")
    moved_bytes = sum(c.stored_len for c in todo)
    return Transfer(
        entry.digest,
        entry.name,
        entry.version,
        len(chunks),
        len(todo),
        moved_bytes,
        time.monotonic() - start,
    )


def pull(
    src: S3Location,
    ref: str,
    store: WritableStore,
    s3: Any,
    workers: int = 8,
    manifest_only: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Transfer:
    """Download image `ref` (NAME:VERSION, NAME for the newest, or a manifest digest) into `store`:
    the chunks it lacks (each verified), then the manifest, then the catalog entry. With
    `manifest_only`, only the manifest and catalog entry: a controller that sends agents to the
    bucket for chunks (`sledge serve --s3-store`) needs no more on its own disk."""
    start = time.monotonic()
    name, version, digest = resolve(s3, src, ref)
    data = _get(s3, src, layout.manifest_path(digest), Limits().max_manifest_bytes)
    if data is None:
        key = src.key(layout.manifest_path(digest))
        raise S3Error(f"{src}: manifest {digest} is not in the bucket (no object {key})")
    try:
        manifest = decode(data, expect_digest=digest)
    except ManifestError as exc:
        raise S3Error(f"{src}: manifest {digest}: {exc}") from None
    chunks = [] if manifest_only else _distinct(manifest)
    todo = [c for c in chunks if store.stored_size(c.hex) != c.stored_len]

    def download(chunk: Chunk) -> None:
        key = src.key(layout.chunk_path(chunk.hex))
        stored = _get(s3, src, layout.chunk_path(chunk.hex), chunk.stored_len)
        if stored is None:
            raise S3Error(
                f"{src}: {chunk.describe()} of image {ref} is missing from the bucket (no object {key})"
            )
        try:
            decode_stored(chunk, stored)
        except ChunkInvalid as exc:
            raise S3Error(f"{src}: object {key}: {exc.reason}") from None
        store.put_chunk(chunk.hex, stored)
        if progress is not None:
            progress(len(stored))

    with store.lock():  # prune (exclusive) must not take chunks between here and the manifest
        _run_all(download, todo, workers)
        if store.put_manifest(manifest) != digest:  # canonical bytes: cannot differ once decoded
            raise S3Error(f"{src}: manifest {digest} re-encodes to another digest")
        if name:
            store.tag(name, version, digest)
    return Transfer(
        digest,
        name,
        version,
        len(chunks),
        len(todo),
        sum(c.stored_len for c in todo),
        time.monotonic() - start,
    )


def resolve(s3: Any, loc: S3Location, ref: str) -> tuple[str, str, str]:
    """(name, version, digest) of NAME:VERSION, NAME (the newest by upload time) or a digest."""
    if _HEX64.fullmatch(ref):
        return "", "", ref
    name, version = layout.parse_ref(ref)
    if version is None:
        directory = loc.key(f"catalog/{name}/")
        newest: tuple[Any, str] | None = None
        with boto_errors(f"{loc}: listing {directory}"):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=directory):
                for obj in page.get("Contents", []):
                    candidate = obj["Key"][len(directory) :]
                    if "/" not in candidate and (newest is None or obj["LastModified"] > newest[0]):
                        newest = (obj["LastModified"], candidate)
        if newest is None:
            raise S3Error(f"{loc}: image {name!r} is not in the bucket's catalog (nothing under {directory})")
        version = layout.check_name("version", newest[1])
    text = _get(s3, loc, layout.catalog_path(name, version), 200)
    if text is None:
        raise S3Error(f"{loc}: image {name}:{version} is not in the bucket's catalog")
    try:
        digest = layout.check_digest(text.decode("ascii", "replace").strip())
    except layout.LayoutError as exc:
        raise S3Error(f"{loc}: catalog entry {name}:{version}: {exc}") from None
    return name, version, digest


def presigner(s3: Any, loc: S3Location, seconds: int) -> Callable[[str], str]:
    """relative store path -> a GET URL that works without credentials for `seconds`.

    Signing is local (no request to the bucket): the controller answers agents at once."""
    if not 1 <= seconds <= MAX_PRESIGN_SECONDS:
        raise S3Error(f"presigned URL lifetime {seconds} s: expected 1 to {MAX_PRESIGN_SECONDS}")

    def sign(relative: str) -> str:
        with boto_errors(f"{loc}: signing {relative}"):
            url: str = s3.generate_presigned_url(
                "get_object", Params={"Bucket": loc.bucket, "Key": loc.key(relative)}, ExpiresIn=seconds
            )
        return url

    sign("catalog/")  # no credentials is an error at start-up, not on an agent's first chunk
    return sign


# ---- helpers ----------------------------------------------------------------------------------


def _distinct(manifest: Manifest) -> list[Chunk]:
    seen: dict[str, Chunk] = {}
    for c in manifest.data_chunks():
        seen.setdefault(c.hex, c)
    return list(seen.values())


def _put(s3: Any, loc: S3Location, relative: str, body: bytes, cache: str) -> None:
    with boto_errors(f"{loc}: uploading {relative}"):
        s3.put_object(
            Bucket=loc.bucket,
            Key=loc.key(relative),
            Body=body,
            ContentType="application/octet-stream",
            CacheControl=cache,
        )


def _get(s3: Any, loc: S3Location, relative: str, limit: int) -> bytes | None:
    """An object's bytes (at most limit + 1 read, so an oversized one is seen), None if absent."""
    key = loc.key(relative)
    try:
        with boto_errors(f"{loc}: downloading {key}"):
            try:
                body = s3.get_object(Bucket=loc.bucket, Key=key)["Body"]
            except Exception as exc:
                if _missing(exc):
                    return None
                raise
            try:
                data: bytes = body.read(limit + 1)
            finally:
                body.close()
    except OSError as exc:
        raise S3Error(f"{loc}: downloading {key}: {exc}") from None
    if len(data) > limit:
        raise S3Error(f"{loc}: object {key} is larger than the {limit} bytes expected")
    return data


def _run_all(job: Callable[[Chunk], None], chunks: list[Chunk], workers: int) -> None:
    """Run `job` over `chunks` on `workers` threads; the first failure stops the rest and is raised."""
    if not chunks:
        return
    stop = threading.Event()

    def guarded(chunk: Chunk) -> None:
        if not stop.is_set():
            job(chunk)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
        futures = [pool.submit(guarded, c) for c in chunks]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f.exception() for f in done if f.exception() is not None), None)
            if failed is not None:
                raise failed
        except BaseException:  # a failure or Ctrl-C: what is queued must not run on
            stop.set()
            for f in futures:
                f.cancel()
            raise
