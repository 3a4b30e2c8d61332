"""Manifests and chunks straight from the chunk store, laid out as on disk.

/v1/store/ mirrors the store directory (docs/image-format.md), so an nginx serving
DATA/store is interchangeable with the controller as a chunk source. Files go out
with sendfile (web.FileResponse, which also answers Range); the ETag is the
content digest and, the content being addressed by it, it is cached forever.
"""

from __future__ import annotations

from aiohttp import web

from agent.image import layout
from agent.protocol import STORE_PATH
from controller.api.context import ETAG, SERVED, Route, services
from controller.state.errors import NotFound

IMMUTABLE = "public, max-age=31536000, immutable"


async def _serve(request: web.Request, digest: str, relative: str) -> web.StreamResponse:
    path = services(request).config.store_dir / relative
    if not path.is_file():
        raise NotFound(f"{relative}: not in the chunk store")
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
