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
