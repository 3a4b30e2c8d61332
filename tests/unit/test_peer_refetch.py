"""A deploy onto a disk that is not known blank (every real one) checks each chunk in place first;
the chunks found wrong must then be fetched in the swarm's order (ready at a peer, paced, at most
`parallel` at a time), not at once by the thread that checked them (which bypassed the order: the
real fleet case fetched 3-5 chunks from peers at once with `parallel` 2)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from agent.image.manifest import Chunk, Manifest
from agent.peer.swarm import Swarm
from agent.protocol import AnnounceReply, PeerGrant
from agent.writer.device import open_target
from agent.writer.errors import FetchError
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.plan import Action, Step
from tests.images import MiB, random_image
from tests.stores import import_store


def lone_swarm(manifest: Manifest, digest: str) -> Swarm:
    swarm = Swarm(
        manifest, digest, "j-000000000001", lambda m: AnnounceReply(PeerGrant(0, "00" * 32, "t", 0.0))
    )
    swarm.announce()  # a swarm of one: every chunk is its own to fetch, handed out `parallel` at a time
    return swarm


class CountingSource:
    """Serves the image's bytes slowly, counting fetches at once and those the order did not hand out."""

    name = "counting"
    serves_raw = True

    def __init__(self, src: Path, swarm: Swarm) -> None:
        self.data = src.read_bytes()
        self.swarm = swarm
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.unordered: list[int] = []

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            if chunk.index not in self.swarm.inflight:
                self.unordered.append(chunk.index)
        try:
            time.sleep(0.05)
            buf[: chunk.length] = self.data[chunk.offset : chunk.offset + chunk.length]
            return chunk.length
        finally:
            with self.lock:
                self.now -= 1
            self.swarm.settled(chunk.index)  # as the peer source does

    def get(self, relative: str, limit: int) -> bytes:
        raise FetchError(self.name, "chunks only", missing=True)

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_chunks_found_wrong_in_place_are_fetched_in_the_swarm_s_order(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", 8 * MiB, seed=7)
    _, manifest, digest = import_store(tmp_path / "store", src)
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(256) * (8 * MiB // 256))  # a used disk: not blank, every chunk wrong
    swarm = lone_swarm(manifest, digest)
    source = CountingSource(src, swarm)
    target = open_target(str(disk), manifest.image_size)
    assert not target.fresh
    try:
        options = WriteOptions(
            workers=6, order=swarm.order, on_verified=swarm.on_verified, refetch=swarm.refetch
        )
        report = Writer(manifest, digest, [source], target, options).run()
    finally:
        target.close()
    assert disk.read_bytes()[: manifest.image_size] == src.read_bytes()
    assert report.chunks_fetched == len(manifest)
    assert source.unordered == [], "fetched by the thread that checked them, not handed out by the order"
    assert source.most <= swarm.parallel, f"{source.most} fetches at once, expected at most {swarm.parallel}"
    assert swarm.ended and not swarm.pending and not swarm.inflight


def test_a_refetch_after_the_order_ended_is_the_caller_s_own(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", 2 * MiB, seed=8)
    _, manifest, digest = import_store(tmp_path / "store", src)
    swarm = lone_swarm(manifest, digest)
    checks = [Step(c, Action.CHECK) for c in manifest]
    order = swarm.order(iter(checks))
    assert [next(order) for _ in checks] == checks, "checks are local work: handed out first"
    assert swarm.refetch(Step(manifest.chunk(1), Action.FETCH)), "the order takes a chunk found wrong"
    step = next(order)
    assert (step.chunk.index, step.action) == (1, Action.FETCH)
    swarm.settled(1)
    assert next(order, None) is None
    assert not swarm.refetch(Step(manifest.chunk(0), Action.FETCH)), "an ended order takes nothing back"
