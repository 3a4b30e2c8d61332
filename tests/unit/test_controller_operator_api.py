"""The operator API, file serving, boot decisions, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent.image import layout
from agent.protocol import REGISTER_PATH, STORE_PATH, job_events_path, job_finish_path
from controller.app import routes
from tests.unit.test_controller_kit import AioClient, add_image, event, start

MAC1 = "52:54:00:00:00:01"


async def test_every_operator_route_needs_the_operator_token(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    operator_routes = [r for r in routes() if r.auth == "operator"]
    assert len(operator_routes) >= 12
    for route in operator_routes:
        path = route.path.replace("{machine}", "x").replace("{job_id}", "j-000000000000")
        for headers in (
            {},
            {"Authorization": "Bearer slo_0000000000000000_" + "A" * 43},
            {"Authorization": "Basic x"},
        ):
            r = await h.client.request(route.method, path, headers=headers)
            assert r.status == 401, (route.method, path, headers)
            assert "operator token" in (await r.json())["error"]
    assert (await h.client.get("/v1/machines", headers=h.op)).status == 200
    assert os.stat(h.config.data_dir / "operator.token").st_mode & 0o777 == 0o600


async def test_machines_images_jobs_and_cancel(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    digest = add_image(h.config.store_dir, "tiny", "1")
    machine_id = await h.enroll(MAC1, hostname="node1")
    r = await h.client.post("/v1/images", json={"ref": "tiny:1"}, headers=h.op)
    assert r.status == 201 and (await r.json())["digest"] == digest
    r = await h.client.post("/v1/images", json={"ref": "nope:1"}, headers=h.op)
    assert (
        r.status == 404
        and "image 'nope:1': not registered and not in the chunk store" in (await r.json())["error"]
    )
    images = await (await h.client.get("/v1/images", headers=h.op)).json()
    assert [(i["name"], i["version"], i["chunks"]) for i in images["images"]] == [("tiny", "1", 1)]

    r = await h.client.patch(f"/v1/machines/{MAC1}", json={"disk_hints": {"serial": "S1"}}, headers=h.op)
    assert r.status == 200 and (await r.json())["disk_hints"] == {"serial": "S1"}
    job = await h.create_job("node1", "deploy", image="tiny")  # by hostname; newest version
    assert job["params"]["manifest_digest"] == digest and job["params"]["disk"] == {"serial": "S1"}
    assert job["machine_id"] == machine_id and job["state"] == "queued"
    machine = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert machine["desired_image"] == "tiny:1" and machine["jobs"][0]["id"] == job["id"]

    listed = await (
        await h.client.get("/v1/jobs", params={"state": "queued", "machine": "node1"}, headers=h.op)
    ).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    r = await h.client.post(f"/v1/jobs/{job['id']}/cancel", headers=h.op)
    assert r.status == 200 and (await r.json())["state"] == "cancelled"
    r = await h.client.post(f"/v1/jobs/{job['id']}/cancel", headers=h.op)
    assert (
        r.status == 409
        and "expected queued or running to cancel it, but it is cancelled" in (await r.json())["error"]
    )
    assert await h.claim(machine_id) is None

    job2 = await h.create_job(machine_id, "inventory")
    await h.claim(machine_id)
    r = await h.client.delete(f"/v1/machines/{machine_id}", headers=h.op)
    assert r.status == 409 and f"job {job2['id']} is running" in (await r.json())["error"]
    await h.client.post(f"/v1/jobs/{job2['id']}/cancel", headers=h.op)
    assert (await h.client.delete(f"/v1/machines/{machine_id}", headers=h.op)).status == 200
    assert (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).status == 404


async def test_a_deployed_machine_boots_from_disk_until_given_work(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    add_image(h.config.store_dir)
    machine_id = await h.enroll(MAC1)
    job = await h.create_job(machine_id, "deploy", image="tiny:1")
    await h.claim(machine_id)
    assert "sledge.token=" in await (await h.client.get("/boot/ipxe", params={"mac": MAC1})).text()
    finish = {"attempt": 1, "result": {"outcome": "succeeded", "bytes_written": 4200}}
    await h.client.post(job_finish_path(job["id"]), json=finish, headers=h.agent(machine_id))
    script = await (await h.client.get("/boot/ipxe", params={"mac": MAC1})).text()
    assert script.endswith("\nexit 1\n") and "sledge.token" not in script
    await h.create_job(machine_id, "erase")
    assert "sledge.token=" in await (await h.client.get("/boot/ipxe", params={"mac": MAC1})).text()


async def test_chunks_and_manifests_are_served_like_the_store(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    digest = add_image(h.config.store_dir)
    manifest = (h.config.store_dir / layout.manifest_path(digest)).read_bytes()
    r = await h.client.get(STORE_PATH + layout.manifest_path(digest))
    assert r.status == 200 and await r.read() == manifest
    assert r.headers["ETag"] == f'"{digest}"' and "immutable" in r.headers["Cache-Control"]
    chunk_file = next(p for p in (h.config.store_dir / "chunks").rglob("*") if p.is_file())
    url = STORE_PATH + layout.chunk_path(chunk_file.name)
    r = await h.client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and await r.read() == chunk_file.read_bytes()[10:20]
    assert r.headers["ETag"] == f'"{chunk_file.name}"'
    r = await h.client.get(url, headers={"If-None-Match": f'"{chunk_file.name}"'})
    assert r.status == 304
    r = await h.client.head(url)
    assert r.status == 200 and r.headers["Content-Length"] == str(chunk_file.stat().st_size)
    for bad in (
        STORE_PATH + "manifests/..%2F..%2Foperator.token",
        STORE_PATH + "manifests/" + "A" * 64,
        STORE_PATH + "chunks/00/" + chunk_file.name,
        STORE_PATH + "chunks/../../operator.token",
        STORE_PATH + "manifests/" + "0" * 64,
    ):
        r = await h.client.get(bad)
        assert r.status in (400, 404), bad
        assert "slo_" not in await r.text()
    metrics = await (await h.client.get("/metrics")).text()
    served = next(line for line in metrics.splitlines() if line.startswith("sledge_served_bytes_total "))
    assert int(served.split()[1]) == len(manifest) + 10


async def test_boot_files_are_an_allow_list(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    (h.config.boot_dir).mkdir(parents=True)
    (h.config.boot_dir / "vmlinuz").write_bytes(b"kernel")
    assert await (await h.client.get("/boot/files/vmlinuz")).read() == b"kernel"
    r = await h.client.get("/boot/files/initrd.img")
    assert r.status == 404 and "missing (put the agent's kernel and initramfs in" in (await r.json())["error"]
    assert (await h.client.get("/boot/files/state.db")).status == 404


async def test_event_stream_sends_history_then_live_events(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    machine_id = await h.enroll(MAC1)
    job = await h.create_job(machine_id)
    await h.claim(machine_id)
    r = await h.client.get("/v1/events/stream", params={"job": job["id"]}, headers=h.op)
    assert r.headers["Content-Type"].startswith("text/event-stream")

    async def next_event() -> dict[str, object]:
        while True:
            line = (await asyncio.wait_for(r.content.readline(), 5)).decode()
            if line.startswith("data: "):
                data: dict[str, object] = json.loads(line[6:])
                return data

    assert (await next_event())["message"] == "queued: inventory on machine " + machine_id + " (node1)"
    assert (await next_event())["message"] == "started: attempt 1"
    body = {"attempt": 1, "events": [event(1, "hello")]}
    await h.client.post(job_events_path(job["id"]), json=body, headers=h.agent(machine_id))
    live = await next_event()
    assert (live["message"], live["seq"], live["source"]) == ("hello", 1, "agent")
    r.close()


async def test_metrics_and_health(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    await h.enroll(MAC1)
    assert await (await h.client.get("/healthz")).json() == {"ok": True}
    text = await (await h.client.get("/metrics")).text()
    assert 'sledge_machines{state="ready"} 1' in text
    assert 'sledge_jobs{state="queued"} 0' in text
    assert f'sledge_http_request_seconds_count{{method="POST",route="{REGISTER_PATH}"}} 1' in text
    assert 'sledge_http_responses_total{method="GET",route="/boot/ipxe",status="200"} 1' in text


@pytest.mark.parametrize("accept", ["application/msgpack", "application/json"])
async def test_msgpack_both_ways(aiohttp_client: AioClient, tmp_path: Path, accept: str) -> None:
    import msgpack

    h = await start(aiohttp_client, tmp_path)
    token = await h.enrollment_token(MAC1)
    from tests.unit.test_controller_kit import inventory

    body = msgpack.packb({"enrollment_token": token, "inventory": inventory().to_wire()})
    r = await h.client.post(
        REGISTER_PATH, data=body, headers={"Content-Type": "application/msgpack", "Accept": accept}
    )
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/msgpack")
    assert msgpack.unpackb(await r.read())["machine_id"].startswith("m-")
