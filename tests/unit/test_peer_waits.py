"""What an agent's peer threads wait for: told events and their own deadlines, not a clock.

A simulated fleet of 200 agents on 2 cores woke each agent's threads ~35 times a second for
nothing (the fetch order every 0.2 s, the writer's cancel watch every 0.1 s, the peer server's
accept loop every 0.2 s); these waits now end when what they wait for happens.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.image.manifest import Manifest
from agent.peer.server import ACCEPT_POLL, ServeLimits
from agent.peer.swarm import CLOCK_SLACK, IDLE_WAIT, Swarm
from agent.protocol import AnnounceReply, PeerGrant
from tests.images import MiB, random_image
from tests.peerkit import holding_all
from tests.stores import import_store
from tests.unit.test_peer_keepalive import CountingServer


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Manifest, str]:
    src = random_image(tmp_path / "src.img", 2 * MiB, seed=9)
    _, manifest, digest = import_store(tmp_path / "store", src)
    return src, manifest, digest


def swarm_of(manifest: Manifest, digest: str) -> Swarm:
    grant = PeerGrant(0, "00" * 32, "t", 0.0)
    return Swarm(manifest, digest, "j-000000000001", lambda m: AnnounceReply(grant))


def test_the_fetch_order_wakes_when_a_back_off_ends_or_patience_runs_out(
    image: tuple[Path, Manifest, str],
) -> None:
    _, manifest, digest = image
    swarm = swarm_of(manifest, digest)
    now = 1000.0
    swarm.progress, swarm.patience = now, 30.0
    assert swarm._wake_in(now) == IDLE_WAIT  # nothing due within IDLE_WAIT: the bound
    swarm.busy = {"http://a": now + 0.3, "http://b": now + 0.7, "http://c": now - 5.0}
    assert swarm._wake_in(now) == pytest.approx(0.3 + CLOCK_SLACK)  # the soonest back-off to end
    swarm.busy = {}
    swarm.progress = now - 29.6  # patience runs out in 0.4 s: then any pending chunk goes to the sources
    assert swarm._wake_in(now) == pytest.approx(0.4 + CLOCK_SLACK)
    swarm.progress = now - 31.0  # ran out already: it is no deadline to wait for
    assert swarm._wake_in(now) == IDLE_WAIT
    swarm.busy = {"http://a": now + 0.0001}
    assert swarm._wake_in(now) >= CLOCK_SLACK  # never a zero wait that spins


def test_a_drop_wakes_the_fetch_order(image: tuple[Path, Manifest, str]) -> None:
    """The order may hand a chunk to the sources once this agent is alone: a drop tells it so at once."""
    _, manifest, digest = image
    swarm = swarm_of(manifest, digest)
    waiting, woke = threading.Event(), threading.Event()

    def waiter() -> None:
        with swarm.lock:
            waiting.set()  # the lock is held until wait() lets it go: the drop below comes after
            if swarm.lock.wait(IDLE_WAIT * 5):
                woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(10)
    swarm.drop("http://127.0.0.1:1", "served bad bytes")
    t.join()
    assert woke.is_set(), "a waiting fetch thread was not told of the drop"


def test_closing_the_peer_server_does_not_wait_out_its_accept_poll(image: tuple[Path, Manifest, str]) -> None:
    with holding_all(*image, ServeLimits(), CountingServer) as server:
        time.sleep(0.1)  # its thread waits in the accept loop's poll
        t0 = time.monotonic()
        server.close()  # (holding_all closes it again: a second close is harmless)
        took = time.monotonic() - t0
        assert server._thread is not None and not server._thread.is_alive()
    assert took < ACCEPT_POLL / 2, f"close() took {took:.2f} s: it waited for the poll to end"
