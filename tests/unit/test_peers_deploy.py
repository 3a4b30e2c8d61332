"""deploy with sledge.peers=1 on fakes: sharing is an optimisation, never a reason to fail."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from agent import protocol as p
from agent.runtime.jobs.deploy import deploy
from agent.runtime.transport import Rejected
from tests.jobkit import fake_disk, rig
from tests.unit.test_jobs_fake import store_with_image


def _refuse(message: p.Announce) -> p.AnnounceReply:
    raise Rejected(f"POST /v1/agent/peers: HTTP 409: job {message.job_id} moved on")


def test_a_tracker_that_refuses_leaves_the_deploy_to_its_sources(tmp_path: Path) -> None:
    store, image, _, digest = store_with_image(tmp_path)
    r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, p.JobParams(manifest_digest=digest), store)
    r.ctx.config = dataclasses.replace(r.ctx.config, peers=True, peer_host="127.0.0.1")
    r.ctx.announce = _refuse
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    with open(r.disks.file("/dev/vda"), "rb") as f:
        assert f.read(len(image)) == image
    assert any("peers: announce failed (POST /v1/agent/peers: HTTP 409" in line for line in r.lines), r.lines
    summary = [line for line in r.lines if "peers: fetched 0 bytes from 0 peers" in line]
    assert summary and summary[0].endswith("; 0 asks found a peer busy"), r.lines
    assert sum("announce failed" in line for line in r.lines) == 1, "said once, not at every interval"


def test_an_agent_whose_first_announce_failed_still_says_it_leaves(tmp_path: Path) -> None:
    """Its later announces made it a holding others ask: without a leaving announce the tracker
    named it to them for the ttl (30 s) after it was gone."""
    store, _, _, digest = store_with_image(tmp_path)
    r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, p.JobParams(manifest_digest=digest), store)
    r.ctx.config = dataclasses.replace(r.ctx.config, peers=True, peer_host="127.0.0.1", peer_linger=1.0)
    said: list[p.Announce] = []

    def flaky(message: p.Announce) -> p.AnnounceReply:
        said.append(message)
        if len(said) == 1:
            raise Rejected("POST /v1/agent/peers: HTTP 503: the controller is restarting")
        return p.AnnounceReply(p.PeerGrant(0, "00" * 32, "t", 0.0), interval=0.1)

    r.ctx.announce = flaky
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    assert len(said) > 2 and said[-1].leaving and not any(m.leaving for m in said[:-1]), said


def test_a_failing_announce_is_logged_once_and_its_end_too() -> None:
    """Each log line is a job event the controller stores: a tracker refusing for a minute wrote
    one a second."""
    import threading
    import time

    from agent.image.manifest import ChunkEntry, ChunkKind, Encoding, Manifest, Metadata
    from agent.peer.swarm import Swarm

    MiB = 1 << 20
    entries = [ChunkEntry(bytes([i]) * 32, ChunkKind.DATA, Encoding.RAW, MiB) for i in range(4)]
    manifest = Manifest.build(4 * MiB, MiB, Metadata("x", "1"), entries)

    answers: list[Exception | None] = (
        [Rejected("HTTP 409: a")] * 5 + [Rejected("HTTP 503: b")] * 3 + [None] * 3
    )

    def announcer(message: p.Announce) -> p.AnnounceReply:
        answer = answers.pop(0) if answers else None
        if answer is not None:
            raise answer
        return p.AnnounceReply(p.PeerGrant(0, "00" * 32, "t", 0.0), interval=0.01)

    swarm = Swarm(manifest, "ab" * 32, "j-000000000001", announcer)
    swarm.interval = 0.01
    lines: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=swarm.run, args=(stop, lines.append, "HTTP 409: a"), daemon=True)
    thread.start()
    end = time.monotonic() + 5
    while answers and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.05)
    stop.set()
    swarm.news.set()
    thread.join(2)
    assert lines == [
        "peers: announce failed: HTTP 503: b (said once; the next that works says so)",
        "peers: announces work again",
    ], lines


def test_a_peer_port_in_use_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    store, _, _, digest = store_with_image(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, p.JobParams(manifest_digest=digest), store)
        r.ctx.config = dataclasses.replace(r.ctx.config, peers=True, peer_host="127.0.0.1", peer_port=port)
        r.ctx.announce = _refuse
        outcome = deploy(r.ctx)
    finally:
        taken.close()
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    assert any(f"peers: cannot listen on 127.0.0.1:{port}" in line for line in r.lines), r.lines
