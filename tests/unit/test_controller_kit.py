"""Shared helpers for the controller tests (no tests here): inventories, an app on a real
aiohttp server, enrollment through the boot script, a tiny real chunk store."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent.hardware.model import Cpu, Inventory, Memory, Nic, System
from agent.image.manifest import ChunkEntry, ChunkKind, Encoding, Manifest, Metadata
from agent.protocol import NEXT_JOB_PATH, REGISTER_PATH, Event, EventKind
from controller.app import make_app
from controller.auth import ensure_operator_token, operator_token_path
from controller.config import Config
from controller.images.store import WritableStore
from controller.state.sqlite import SqliteStore
from controller.state.store import Store

AioClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def inventory(
    uuid: str = "4c4c4544-0000-1000-8000-000000000001",
    macs: tuple[str, ...] = ("52:54:00:00:00:01",),
    hostname: str = "node1",
) -> Inventory:
    system = System("QEMU", "Standard PC", "S1", uuid, None, None, None, "uefi", None, hostname)
    nics = tuple(
        Nic(f"eth{i}", mac, mac, "virtio_net", None, 1000, True, 1500, True, ()) for i, mac in enumerate(macs)
    )
    return Inventory(
        1, system, Cpu("cpu", "x86_64", 1, 2, 2, ()), Memory(1 << 30, None, ()), (), nics, (), None
    )


def event(seq: int, message: str = "", done: int | None = None, total: int | None = None) -> dict[str, Any]:
    return Event(
        seq,
        1700000000.0 + seq,
        EventKind.PROGRESS if done is not None else EventKind.LOG,
        message,
        done,
        total,
    ).to_wire()


@dataclass
class Clock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    config: Config
    store: Store
    clock: Clock
    operator: str
    agents: dict[str, str] = field(default_factory=dict)  # machine id -> agent token

    @property
    def op(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator}"}

    def agent(self, machine_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.agents[machine_id]}"}

    async def enrollment_token(self, mac: str) -> str:
        response = await self.client.get("/boot/ipxe", params={"mac": mac})
        assert response.status == 200, await response.text()
        match = re.search(r"sledge\.token=(\S+)", await response.text())
        assert match, await response.text()
        return match.group(1)

    async def enroll(self, mac: str = "52:54:00:00:00:01", uuid: str = "", hostname: str = "node1") -> str:
        uuid = uuid or f"4c4c4544-0000-1000-8000-{mac.replace(':', '')}"
        token = await self.enrollment_token(mac)
        body = {"enrollment_token": token, "inventory": inventory(uuid, (mac,), hostname).to_wire()}
        response = await self.client.post(REGISTER_PATH, json=body)
        assert response.status == 200, await response.text()
        reply = await response.json()
        self.agents[reply["machine_id"]] = reply["agent_token"]
        return str(reply["machine_id"])

    async def create_job(self, machine: str, kind: str = "inventory", **extra: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/jobs", json={"machine": machine, "kind": kind, **extra}, headers=self.op
        )
        assert response.status == 201, await response.text()
        job: dict[str, Any] = await response.json()
        return job

    async def claim(self, machine_id: str, wait: float = 0) -> dict[str, Any] | None:
        response = await self.client.get(
            NEXT_JOB_PATH, params={"wait": str(wait)}, headers=self.agent(machine_id)
        )
        if response.status == 204:
            return None
        assert response.status == 200, await response.text()
        assignment: dict[str, Any] = await response.json()
        return assignment


def add_image(store_dir: Path, name: str = "tiny", version: str = "1", data: bytes = b"sledge!" * 600) -> str:
    """A one-chunk image in a real chunk store; returns the manifest digest."""
    store = WritableStore(store_dir)
    digest = blake3.blake3(data).digest()
    store.put_chunk(digest.hex(), data)
    entry = ChunkEntry(digest, ChunkKind.DATA, Encoding.RAW, len(data))
    manifest = Manifest.build(len(data), 1 << 20, Metadata(name, version), [entry])
    manifest_digest = store.put_manifest(manifest)
    store.tag(name, version, manifest_digest)
    return manifest_digest


async def start(
    aiohttp_client: AioClient,
    tmp_path: Path,
    store: Store | None = None,
    app_args: dict[str, Any] | None = None,
    **overrides: Any,
) -> Harness:
    config = Config(data_dir=tmp_path / "data", **overrides)
    key = ensure_operator_token(config.data_dir)
    clock = Clock()
    app_args = app_args or {}
    store = store or SqliteStore(tmp_path / "state.db")
    client = await aiohttp_client(make_app(config, store, operator_key=key, clock=clock, **app_args))
    token = operator_token_path(config.data_dir).read_text().strip()
    return Harness(client, config, store, clock, token)
