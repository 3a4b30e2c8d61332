"""A real `sledge serve --discovery closed` on 127.0.0.1, an attacker's requests from a socket
bound to 127.0.0.2, and the operator's `sledge machine expect | show | accept` against it."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.hardware.model import Inventory
from tests.integration.test_controller_serve import Server, free_port, sledge
from tests.unit.test_controller_kit import inventory
from tests.unit.test_trust import disk, with_disks

MAC = "52:54:00:aa:bb:07"
UNKNOWN = "52:54:00:aa:bb:66"


def request(
    server: Server, source: str, method: str, path: str, body: object = None
) -> tuple[int, str, dict[str, str]]:
    """One HTTP request whose connection comes from `source` (an address on loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode(), dict(r.headers)
    finally:
        conn.close()


def boot(server: Server, source: str, mac: str) -> str | None:
    status, script, _ = request(server, source, "GET", f"/boot/ipxe?mac={mac}")
    assert status == 200, script
    match = re.search(r"sledge\.token=(\S+)", script)
    return match.group(1) if match else None


def register(server: Server, source: str, token: str, inv: Inventory) -> tuple[int, Any]:
    status, text, _ = request(
        server, source, "POST", "/v1/agent/register", {"enrollment_token": token, "inventory": inv.to_wire()}
    )
    return status, json.loads(text)


@pytest.fixture
def closed(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", free_port(), ("--discovery", "closed", "--enrollment-ttl", "120"))
    s.start()
    yield s
    s.stop()


def test_closed_discovery_stolen_token_and_quarantine_on_a_real_server(
    closed: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert boot(closed, "127.0.0.2", UNKNOWN) is None  # nobody expects it: `exit`, no token
    assert boot(closed, "127.0.0.1", MAC) is None
    rc, out, err = sledge(capsys, closed, "machine", "expect", MAC)
    assert rc == 0 and "expected" in out, err

    token = boot(closed, "127.0.0.1", MAC)
    assert token
    original = with_disks(inventory(macs=(MAC,)), disk("sda", "S1"), disk("sdb", "S2"))
    status, body = register(closed, "127.0.0.2", token, original)  # the token, stolen, used elsewhere
    assert status == 401 and "from address 127.0.0.2, expected 127.0.0.1" in body["error"]
    status, reply = register(closed, "127.0.0.1", token, original)
    assert status == 200
    machine_id = reply["machine_id"]

    rc, out, err = sledge(capsys, closed, "erase", MAC)
    assert rc == 0, err
    token = boot(closed, "127.0.0.1", MAC)  # a queued job: it may enroll again
    assert token
    replaced = with_disks(inventory(macs=(MAC,)), disk("sda", "S1"), disk("sdb", "S3"))
    status, reply = register(closed, "127.0.0.1", token, replaced)
    assert status == 200 and reply["machine_id"] == machine_id
    conn = http.client.HTTPConnection("127.0.0.1", closed.port, timeout=10)
    conn.request(
        "GET", "/v1/agent/jobs/next?wait=0", headers={"Authorization": f"Bearer {reply['agent_token']}"}
    )
    assert conn.getresponse().status == 204  # quarantined: the erase waits
    conn.close()

    rc, out, err = sledge(capsys, closed, "machine", "show", MAC)
    assert rc == 0, err
    assert f"machine   {machine_id}  (quarantined)" in out
    assert "  change  disk serial=S2 removed\n  change  disk serial=S3 added\n" in out
    rc, out, err = sledge(capsys, closed, "machine", "accept", MAC)
    assert rc == 0 and f"{machine_id}: accepted, now ready" in out and "serial=S3" in out, err
    rc, out, err = sledge(capsys, closed, "machine", "show", MAC)
    said = out.split("events (newest last)\n", 1)[-1]
    assert " accepted by operator: " in said and said.index("quarantined") < said.index("accepted"), out
    rc, _, err = sledge(capsys, closed, "machine", "accept", MAC)
    assert rc == 1 and "expected a quarantined machine to accept, but it is ready" in err

    status, metrics, _ = request(closed, "127.0.0.1", "GET", "/metrics")
    assert 'sledge_enrollment_refusals_total{reason="discovery_closed"} 2' in metrics
    assert 'sledge_enrollment_refusals_total{reason="address"} 1' in metrics
    assert 'sledge_machines{state="quarantined"} 0' in metrics


def test_the_rate_limit_holds_on_a_real_server(closed: Server) -> None:
    forged = "sle_0000000000000000_" + "A" * 43
    statuses = [register(closed, "127.0.0.2", forged, inventory(macs=(MAC,)))[0] for _ in range(7)]
    assert statuses == [401] * 5 + [429] * 2  # five failures per MAC in the window by default
    status, _, headers = request(
        closed,
        "127.0.0.2",
        "POST",
        "/v1/agent/register",
        {"enrollment_token": forged, "inventory": inventory(macs=(MAC,)).to_wire()},
    )
    assert status == 429 and 0 < int(headers["Retry-After"]) <= 300


def test_an_operator_gives_one_machine_a_shell_through_its_kernel_args(
    closed: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = sledge(capsys, closed, "machine", "expect", MAC)
    assert rc == 0, err
    rc, out, err = sledge(capsys, closed, "machine", "set", MAC, "--kernel-args", "sledge.shell=1")
    assert rc == 0 and "kernel args sledge.shell=1 from its next agent boot" in out, err
    _, script, _ = request(closed, "127.0.0.1", "GET", f"/boot/ipxe?mac={MAC}")
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert kernel.endswith("console=tty0 console=ttyS0,115200 sledge.shell=1"), kernel
    rc, out, err = sledge(capsys, closed, "machine", "show", MAC)
    assert rc == 0 and "boot args sledge.shell=1\n" in out, err
    rc, out, err = sledge(
        capsys, closed, "machine", "set", MAC, "--kernel-args", "sledge.mac=52:54:00:00:00:09"
    )
    assert rc == 1 and "expected arguments the controller does not set itself" in err, (out, err)
