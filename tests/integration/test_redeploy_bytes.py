"""Rebuild, upgrade and rollback move only what changed (issue 13 item 4), counted on the wire.

A real `sledge serve` and the agent runtime writing a GPT image to a loop device: deploying v1
again with new user-data rewrites only the seed (no chunk byte served), v2 moves only v2's
changed chunks, and rolling back to v1 moves only those chunks back. Bytes are read from the
controller's own sledge_served_bytes_total, so anything the writer fetched counts.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from agent.image.manifest import Manifest
from controller.images.store import WritableStore
from tests.images import MiB
from tests.integration.test_agent_runtime import (
    GatedMachine,
    create,
    import_into,
    job,
    machine_registered,
    start_agent,
    wait_for,
)
from tests.integration.test_controller_serve import Server, free_port
from tests.tools import need

IMAGE = 24 * MiB
CHANGED = (3, 7, 8, 15)  # v2's chunks (1 MiB each) that differ from v1


def compressible(rng: random.Random, n: int) -> bytes:
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(200)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def gpt_image(path: Path, seed: int, changed: tuple[int, ...] = ()) -> Path:
    """A GPT disk whose partitions hold compressible data (so stored bytes differ from raw ones);
    the chunks in `changed` get other bytes."""
    with open(path, "wb") as f:
        f.truncate(IMAGE)
    subprocess.run(["sgdisk", "-n", "1:2048:+8M", "-n", "2:0:0", str(path)], check=True, capture_output=True)
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for index in range(1, IMAGE // MiB - 1):  # leave the tables' first and last MiB alone
            if index % 4 != 2:  # some chunks stay zero
                os.pwrite(f.fileno(), compressible(rng, MiB), index * MiB)
        other = random.Random(seed + 1000)
        for index in changed:
            os.pwrite(f.fileno(), compressible(other, MiB), index * MiB)
    return path


def served(server: Server) -> int:
    status, body = server.call("GET", "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    for line in text.splitlines():
        if line.startswith("sledge_served_bytes_total "):
            return int(line.split()[1])
    raise AssertionError(f"no sledge_served_bytes_total in /metrics: {text[:300]}")


def stored_bytes(manifest: Manifest, new: Manifest) -> int:
    """Stored bytes of the data chunks `new` has at an offset where `manifest` has other bytes."""
    return sum(
        c.stored_len for c, old in zip(new, manifest, strict=True) if c.digest != old.digest and c.stored_len
    )


@pytest.mark.root
def test_rebuild_moves_no_chunk_upgrade_and_rollback_move_only_changed_chunks(
    tmp_path: Path,
    loop_device,
    request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
) -> None:
    need("sgdisk", "mcopy")
    server = Server(tmp_path / "data", free_port())
    server.start()
    request.addfinalizer(server.stop)
    v1_digest = import_into(server, gpt_image(tmp_path / "v1.img", 1), "os", "1")
    v2_digest = import_into(server, gpt_image(tmp_path / "v2.img", 1, CHANGED), "os", "2")
    store = WritableStore(server.data / "store")
    v1, v2 = store.manifest(v1_digest), store.manifest(v2_digest)
    manifest_bytes = max(len(store.manifest_bytes(d)) for d in (v1_digest, v2_digest))
    changed, back = stored_bytes(v1, v2), stored_bytes(v2, v1)
    for moved in (changed, back):
        assert 0 < moved < len(CHANGED) * MiB  # zstd did compress: stored bytes, not raw ones

    device = loop_device(64 * MiB)
    machine = GatedMachine(Path(device))
    _agent, thread, lines = start_agent(server, machine, tmp_path, jobs=5)
    request.addfinalizer(lambda: thread.join(30))
    wait_for(lambda: machine_registered(server))

    def deploy(image: str, user_data: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        before = served(server)
        seed = {"user_data": f"#cloud-config\nhostname: {user_data}\n"}
        job_id = create(server, "deploy", image=image, params={"cloud_init": seed})
        wait_for(lambda: job(server, job_id)["state"] in ("succeeded", "failed"), 60)
        detail = job(server, job_id)
        assert detail["state"] == "succeeded", (detail["result"], lines[-10:])
        return served(server) - before, detail

    first, _ = deploy("os:1", "first")
    assert first >= sum(c.stored_len for c in v1)  # a blank disk: every data chunk moved

    rebuild, detail = deploy("os:1", "rebuilt")
    assert rebuild <= manifest_bytes, f"rebuild served {rebuild} bytes, only the manifest expected"
    assert "0 chunks fetched" in detail["result"]["message"]
    # the GPT's two chunks held sledge's own edits (backup moved, seed entry): rebuilt, not fetched
    assert "2 rebuilt from the disk" in detail["result"]["message"]

    upgrade, _ = deploy("os:2", "upgraded")
    assert changed <= upgrade <= changed + manifest_bytes, (upgrade, changed)

    rollback, _ = deploy("os:1", "rolled-back")
    assert back <= rollback <= back + manifest_bytes, (rollback, back)

    verify_id = create(server, "verify", image="os:1")
    wait_for(lambda: job(server, verify_id)["state"] in ("succeeded", "failed"), 60)
    assert job(server, verify_id)["state"] == "succeeded", job(server, verify_id)["result"]
    table = subprocess.run(["sgdisk", "-v", device], capture_output=True, text=True).stdout
    assert "No problems found" in table, table
    with open(device, "rb") as disk, open(tmp_path / "v1.img", "rb") as image:
        # the image's data, past the tables sledge edits (first and last MiB)
        assert os.pread(disk.fileno(), IMAGE - 2 * MiB, MiB) == os.pread(image.fileno(), IMAGE - 2 * MiB, MiB)
