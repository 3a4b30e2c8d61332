"""`sledge serve --s3-store`: /v1/store/ serves what the local store has and redirects the rest to
a presigned URL; a path the store layout refuses is never signed. (The real bucket, signer and
agent are in tests/integration/test_s3_store.py.)"""

from __future__ import annotations

from pathlib import Path

from agent.image import layout
from controller.api.context import SERVICES
from tests.unit.test_controller_kit import AioClient, add_image, start


async def test_local_first_then_a_presigned_redirect_and_never_for_a_bad_path(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    signed: list[str] = []

    def presign(relative: str) -> str:
        signed.append(relative)
        return f"http://bucket.example/{relative}?X-Amz-Signature=abc"

    h.client.app[SERVICES].presign = presign
    digest = add_image(h.config.store_dir)
    r = await h.client.get(f"/v1/store/manifests/{digest}")
    assert r.status == 200 and signed == []  # the local store has it
    absent = "ab" * 32
    for relative in (layout.chunk_path(absent), layout.manifest_path(absent)):
        r = await h.client.get(f"/v1/store/{relative}", allow_redirects=False)
        assert r.status == 307, await r.text()
        assert r.headers["Location"] == f"http://bucket.example/{relative}?X-Amz-Signature=abc"
        assert r.headers["Cache-Control"] == "no-store"
    assert signed == [layout.chunk_path(absent), layout.manifest_path(absent)]
    for bad in (
        "/v1/store/chunks/00/" + absent,  # the wrong directory for that digest
        "/v1/store/manifests/" + "A" * 64,
        "/v1/store/manifests/..%2F..%2Foperator.token",
    ):
        r = await h.client.get(bad, allow_redirects=False)
        assert r.status in (400, 404), (bad, r.status)
    assert len(signed) == 2
