"""deploy, verify and erase on fakes: a directory chunk store and sparse files for disks.

No server and no disk: the jobs get their sources and targets from the job context.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

from agent import protocol as p
from agent.hardware.model import Partition
from agent.image.manifest import ChunkKind, Manifest
from agent.runtime.jobs.deploy import deploy, verify
from agent.runtime.jobs.erase import BTRFS_COPIES, EDGE, erase
from tests.images import MiB, random_bytes, random_image, write_image
from tests.jobkit import GiB, fake_disk, rig
from tests.stores import import_store


def mbr(first_lba: int, sectors: int) -> bytes:
    """A DOS table with one Linux partition (entries 2-4 empty)."""
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", first_lba, sectors)
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


def store_with_image(tmp_path: Path, size: int = 8 * MiB) -> tuple[Path, bytes, Manifest, str]:
    src = write_image(
        tmp_path / "src.img",
        size,
        [(0, mbr(2048, (size - MiB) // 512)), (MiB, random_bytes(2 * MiB, 3)), (5 * MiB, b"text\n" * 1000)],
    )
    root, manifest, digest = import_store(tmp_path / "store", src)
    return root, src.read_bytes(), manifest, digest


def test_deploy_writes_the_image_to_the_hinted_disk_only(tmp_path: Path) -> None:
    store, image, manifest, digest = store_with_image(tmp_path)
    disks = [fake_disk("vda", serial="A"), fake_disk("vdb", serial="B")]
    params = p.JobParams(manifest_digest=digest, disk=p.DiskHints.of({"serial": "B"}))
    r = rig(tmp_path, disks, p.JobKind.DEPLOY, params, store)
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    assert outcome.result.disk == "/dev/vdb" and outcome.then is p.PowerAction.REBOOT
    with open(r.disks.file("/dev/vdb"), "rb") as f:
        assert f.read(len(image)) == image
    assert r.disks.file("/dev/vda").stat().st_blocks == 0  # the other disk never written
    assert r.sources.opened == [("http://c/v1/store",)]  # the controller's store, from the config
    data = sum(c.length for c in manifest if c.kind is ChunkKind.DATA)
    assert outcome.result.bytes_written == data


def test_deploy_with_cloud_init_adds_a_seed_partition_after_the_image(tmp_path: Path) -> None:
    store, image, _, digest = store_with_image(tmp_path)
    cloud = p.CloudInit(user_data="#cloud-config\nhostname: fake\n")
    params = p.JobParams(manifest_digest=digest, cloud_init=cloud)
    r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, params, store)
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    assert "cloud-init seed in partition 2" in outcome.result.message
    with open(r.disks.file("/dev/vda"), "rb") as f:
        head = f.read(len(image))
        kind, start, sectors = struct.unpack_from("<4xB3xII", head, 446 + 16)  # the second entry
        assert kind != 0 and (start + sectors) * 512 <= 8 * GiB and start * 512 >= 8 * GiB - 8 * MiB
        f.seek(start * 512)
        assert b"CIDATA" in f.read(4096)
    assert head[512:] == image[512:]  # the image itself unchanged past its table


def test_deploy_refuses_a_disk_smaller_than_the_image(tmp_path: Path) -> None:
    store, _, manifest, digest = store_with_image(tmp_path)
    small = fake_disk("vda", size=4 * MiB)
    params = p.JobParams(manifest_digest=digest, disk=p.DiskHints.of({"name": "vda"}))
    r = rig(tmp_path, [small], p.JobKind.DEPLOY, params, store)
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.FAILED
    assert f"image needs {manifest.image_size} bytes, device has {4 * MiB}" in outcome.result.message
    assert r.disks.file("/dev/vda").stat().st_blocks == 0


def test_deploy_stops_at_a_chunk_boundary_when_cancelled(tmp_path: Path) -> None:
    root, manifest, digest = import_store(tmp_path / "store", random_image(tmp_path / "src", 32 * MiB))
    params = p.JobParams(manifest_digest=digest)
    # a slow disk: 32 chunk writes of 0.1 s each on 3 write threads, about 1 s in all
    r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, params, root, pace=0.1)

    def cancel_after_the_first_write() -> None:
        while not (r.disks.opened and r.disks.opened[0].writes):
            time.sleep(0.01)
        r.ctx.cancel.set()

    threading.Thread(target=cancel_after_the_first_write, daemon=True).start()
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.FAILED, outcome.result.message
    assert "cancelled" in outcome.result.message
    (target,) = r.disks.opened
    assert 0 < len(target.writes) < len(manifest) // 2


def test_verify_matches_after_deploy_and_names_a_changed_chunk(tmp_path: Path) -> None:
    store, _, manifest, digest = store_with_image(tmp_path)
    params = p.JobParams(manifest_digest=digest)
    r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, params, store)
    assert deploy(r.ctx).result.outcome is p.Outcome.SUCCEEDED
    ok = verify(r.ctx)
    assert ok.result.outcome is p.Outcome.SUCCEEDED, ok.result.message
    assert ok.result.message == f"/dev/vda matches manifest {digest}"
    changed = manifest.chunk(2)  # random data at 2 MiB
    with open(r.disks.file("/dev/vda"), "r+b") as f:
        f.seek(changed.offset + 100)
        f.write(b"drift")
    bad = verify(r.ctx)
    assert bad.result.outcome is p.Outcome.FAILED
    assert "/dev/vda does not match the image" in bad.result.message
    assert f"{changed.index}@{changed.offset}" in bad.result.message


def filled(path: Path, offsets: list[int]) -> None:
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(b"\xa5" * 4096)


def test_metadata_erase_zeroes_signature_ranges_on_every_eligible_disk(tmp_path: Path) -> None:
    part = Partition("vda1", 1, 1 * GiB, 2 * GiB, (), ())
    disks = [fake_disk("vda", partitions=(part,)), fake_disk("vdb"), fake_disk("vdc", read_only=True)]
    r = rig(tmp_path, disks, p.JobKind.ERASE, p.JobParams(erase_mode=p.EraseMode.METADATA))
    signatures = [0, 8 * GiB - 4096, BTRFS_COPIES[0], 1 * GiB, 3 * GiB - 4096, 1 * GiB + BTRFS_COPIES[0]]
    kept = [EDGE + MiB, 2 * GiB]  # data the metadata erase leaves alone
    for name in ("vda", "vdb", "vdc"):
        filled(r.disks.file(f"/dev/{name}"), signatures + kept)
    outcome = erase(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    assert outcome.result.disk == "/dev/vda,/dev/vdb"
    assert "/dev/vdc skipped: read-only" in outcome.result.message
    for name, zeroed in (("vda", signatures), ("vdb", signatures[:3])):
        with open(r.disks.file(f"/dev/{name}"), "rb") as f:
            for off in zeroed:
                f.seek(off)
                assert f.read(4096) == bytes(4096), (name, off)
            for off in kept:
                f.seek(off)
                assert f.read(4096) == b"\xa5" * 4096, (name, off)
    with open(r.disks.file("/dev/vdc"), "rb") as f:
        assert f.read(4096) == b"\xa5" * 4096  # the read-only disk is never opened


def test_full_erase_zeroes_the_hinted_disk_only(tmp_path: Path) -> None:
    disks = [fake_disk("vda"), fake_disk("vdb")]
    params = p.JobParams(erase_mode=p.EraseMode.FULL, disk=p.DiskHints.of({"name": "vdb"}))
    r = rig(tmp_path, disks, p.JobKind.ERASE, params)
    offsets = [0, 3 * GiB + 12345, 8 * GiB - 4096]
    for name in ("vda", "vdb"):
        filled(r.disks.file(f"/dev/{name}"), offsets)
    outcome = erase(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    assert outcome.result.message == "/dev/vdb: full erase, 8.0 GiB zeroed"
    assert r.disks.file("/dev/vdb").stat().st_blocks == 0  # every byte zeroed (holes)
    with open(r.disks.file("/dev/vda"), "rb") as f:
        for off in offsets:
            f.seek(off)
            assert f.read(4096) == b"\xa5" * 4096
