"""Manifests and chunks straight from the chunk store, laid out as on disk.

/v1/store/ mirrors the store directory (docs/image-format.md), so an nginx serving
DATA/store is interchangeable with the controller as a chunk source. With a bucket
behind it (`sledge serve --s3-store`), what the directory lacks is a redirect to a
presigned URL (docs/stores.md). Files go out
with sendfile (web.FileResponse, which also answers Range); the ETag is the
content digest and, the content being addressed by it, it is cached forever.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from agent.image import layout
from agent.image.store import NotInStore, StoreFileError, open_store_file
from agent.protocol import STORE_PATH
from controller.api.context import ETAG, SERVED, Route, services
from controller.fleet.errors import NotFound

IMMUTABLE = "public, max-age=31536000, immutable"


async def _serve(request: web.Request, digest: str, relative: str) -> web.StreamResponse:
    svc = services(request)
    path = svc.config.store_dir / relative
    if svc.presign is not None and not path.exists():
        # The bucket has it (or answers 404 itself): the agent follows, with no credentials of its
        # own, and the short-lived URL must not be cached in place of the immutable content.
        url = await asyncio.to_thread(svc.presign, relative)
        return web.Response(status=307, headers={"Location": url, "Cache-Control": "no-store"})
    try:  # the store's one guarded opener: a FIFO or device planted in the store is refused, not served
        fd, _ = open_store_file(path)
        os.close(fd)
    except NotInStore:
        raise NotFound(f"{relative}: not in the chunk store") from None
    except StoreFileError as exc:  # the reason only: the store's place on disk is not the client's business
        raise NotFound(f"{relative}: not servable from the chunk store: {exc.reason}") from None
    etag = f'"{digest}"'
    headers = {"Cache-Control": IMMUTABLE, "ETag": etag, "Content-Type": "application/octet-stream"}
    if request.headers.get("If-None-Match", "").strip() in (etag, "*"):
        return web.Response(status=304, headers=headers)
    request[ETAG] = etag  # restored over FileResponse's own (mtime, size) ETag on prepare
    request[SERVED] = True
    return web.FileResponse(path, headers=headers)


async def chunk(request: web.Request) -> web.StreamResponse:
    digest = layout.check_digest(request.match_info["digest"])
    if request.match_info["prefix"] != digest[:2]:
        raise NotFound(
            f"chunk {digest}: lives under chunks/{digest[:2]}/, not chunks/{request.match_info['prefix']}/"
        )
    return await _serve(request, digest, layout.chunk_path(digest))


async def manifest(request: web.Request) -> web.StreamResponse:
    digest = layout.check_digest(request.match_info["digest"])
    return await _serve(request, digest, layout.manifest_path(digest))


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    etag = request.get(ETAG)
    if etag is not None:
        response.headers["ETag"] = etag
    if request.get(SERVED) and request.method == "GET" and response.content_length:
        services(request).metrics.bytes_served += response.content_length


ROUTES = (
    Route(
        "GET",
        f"{STORE_PATH}chunks/{{prefix}}/{{digest}}",
        chunk,
        "A chunk's stored bytes (Range, ETag)",
        auth="none",
        response="Binary",
    ),
    Route(
        "GET",
        f"{STORE_PATH}manifests/{{digest}}",
        manifest,
        "A manifest's canonical bytes",
        auth="none",
        response="Binary",
    ),
)
