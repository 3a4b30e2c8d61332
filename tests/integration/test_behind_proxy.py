"""`sledge serve --trusted-proxy` behind a real nginx reverse proxy on 127.0.0.1.

Each agent talks to nginx from a loopback address of its own (127.0.0.21, .22, ...), nginx to the
controller from 127.0.0.1 with `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for`, as
an operator's proxy does. The controller must see each agent at its own address: the peer url the
tracker hands to the others, the address its enrollment token is bound to, and its own failed
enrollments' limit. Without the flag it sees only nginx.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.peer.bitmap import Have
from agent.protocol import NEXT_JOB_PATH, PEERS_PATH, REGISTER_PATH, Announce, AnnounceReply
from controller.config import store_dir
from tests.integration.test_controller_serve import Server, free_port
from tests.tools import need
from tests.unit.test_controller_kit import add_image, inventory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from webservers import WebServer, nginx_mirror

PROXY = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 60s;
        }}
    }}
"""


class Agent:
    """An agent's requests, from its own loopback address, through the proxy."""

    def __init__(self, proxy: int, address: str) -> None:
        self.proxy, self.address = proxy, address
        self.token = self.machine_id = ""

    def call(self, method: str, path: str, body: object = None, **headers: str) -> tuple[int, Any]:
        bind = (self.address, 0)
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy, timeout=10, source_address=bind)
        try:
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            raw = resp.read()
            wire = resp.getheader("Content-Type", "").startswith("application/json")
            return resp.status, json.loads(raw) if wire else raw.decode()
        finally:
            conn.close()

    def enroll(self, mac: str, token: str = "") -> int:
        if not token:
            status, script = self.call("GET", f"/boot/ipxe?mac={mac}")
            assert status == 200, script
            match = re.search(r"sledge\.token=(\S+)", script)
            assert match, script
            token = match.group(1)
        body = {"enrollment_token": token, "inventory": inventory(uuid=mac, macs=(mac,)).to_wire()}
        status, reply = self.call("POST", REGISTER_PATH, body)
        if status == 200:
            self.machine_id, self.token = reply["machine_id"], reply["agent_token"]
        return status


@pytest.fixture
def controller(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Server, WebServer, str]]:
    need("nginx")
    data = tmp_path / "data"
    digest = add_image(store_dir(data))
    server = Server(data, free_port(), extra=request.param)
    server.start()
    port = free_port()
    (tmp_path / "nginx").mkdir()
    proxy = nginx_mirror(tmp_path / "nginx", port, PROXY.format(port=port, upstream=server.port))
    try:
        with proxy:
            yield server, proxy, digest
    finally:
        server.stop()


def _deploying(server: Server, port: int, digest: str, address: str, mac: str) -> tuple[Agent, str]:
    agent = Agent(port, address)
    assert agent.enroll(mac) == 200
    status, job = server.call(
        "POST",
        "/v1/jobs",
        {"machine": agent.machine_id, "kind": "deploy", "image": "tiny:1"},
        server.operator,
    )
    assert status == 201, job
    status, assignment = agent.call("GET", f"{NEXT_JOB_PATH}?wait=0")
    assert status == 200, assignment
    return agent, job["id"]


def _announce(agent: Agent, job: str, digest: str, held: int) -> AnnounceReply:
    message = Announce(job, digest, 7100, 1, Have(1, held).encode())
    status, reply = agent.call("POST", PEERS_PATH, message.to_wire())
    assert status == 200, reply
    return AnnounceReply.from_wire(reply)


def _pair(controller: tuple[Server, WebServer, str]) -> tuple[tuple[Agent, str], tuple[Agent, str], int, str]:
    """Two deploying agents through the proxy, at 127.0.0.21 and .22; the first holds chunk 0."""
    server, proxy, digest = controller
    port = int(proxy.url.rsplit(":", 1)[1])
    first = _deploying(server, port, digest, "127.0.0.21", "52:54:00:00:05:01")
    second = _deploying(server, port, digest, "127.0.0.22", "52:54:00:00:05:02")
    _announce(*first, digest, 1)
    return first, second, port, digest


@pytest.mark.parametrize("controller", [("--trusted-proxy", "127.0.0.1")], indirect=True, ids=["trusted"])
def test_through_a_trusted_nginx_each_agent_is_seen_at_its_own_address(
    controller: tuple[Server, WebServer, str],
) -> None:
    (first, job1), (second, job2), port, digest = _pair(controller)
    assert [p.url for p in _announce(second, job2, digest, 0).peers] == ["http://127.0.0.21:7100"]

    # a guessing machine behind the proxy is limited at its own address, not everyone's
    forged = "sle_0000000000000000_" + "A" * 43
    guesser = Agent(port, "127.0.0.23")
    statuses = [guesser.enroll(f"52:54:00:00:06:{i:02x}", forged) for i in range(21)]
    assert statuses[:20] == [401] * 20 and statuses[20] == 429, statuses
    assert Agent(port, "127.0.0.24").enroll("52:54:00:00:05:04") == 200
    # and what an agent writes in the header itself is not believed
    status, _ = first.call(
        "POST",
        PEERS_PATH,
        Announce(job1, digest, 7100, 1, Have(1, 1).encode()).to_wire(),
        **{"X-Forwarded-For": "127.0.0.99"},
    )
    assert status == 200
    assert [p.url for p in _announce(second, job2, digest, 0).peers] == ["http://127.0.0.21:7100"]


@pytest.mark.parametrize("controller", [()], indirect=True, ids=["untrusted"])
def test_without_the_flag_the_controller_sees_only_the_proxy_and_says_so(
    controller: tuple[Server, WebServer, str],
) -> None:
    _, (second, job2), _, digest = _pair(controller)
    status, reply = second.call(
        "POST", PEERS_PATH, Announce(job2, digest, 7100, 1, Have(1).encode()).to_wire()
    )
    assert status == 409 and "peer url http://127.0.0.1:7100: already announced by machine" in reply["error"]
    assert "--trusted-proxy" in reply["error"], "the refusal says what to do"
