"""The issue's figure: BMC requests per minute per machine while idle, counted at the emulators.

A real `sledge serve` with two idle machines, one behind sushy-tools' Redfish emulator (HTTP
requests counted from the emulator's access log) and one behind ipmi_sim (UDP datagrams counted by
a relay in front of it). The poll interval is shortened so that the window holds a few polls;
per minute at the default interval it is (requests per poll) x (60 / --power-poll).
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import REGISTER_PATH
from tests.integration.test_controller_serve import Server, free_port
from tests.integration.test_power_emulators import PASSWORD, Emulator, ipmi, redfish
from tests.unit.test_controller_kit import inventory

POLL = 10.0  # seconds (sledge's poller looks every 5 s)
WINDOW = 42.0


class UdpCounter:
    """A UDP relay on 127.0.0.1 that counts the datagrams its clients send to `port`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sent = 0
        self.sessions = 0  # clients seen: ipmitool opens one socket per run
        self._up: dict[tuple[str, int], socket.socket] = {}
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def address(self) -> str:
        return f"ipmi://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        while not self._stop:
            ups = {s: client for client, s in self._up.items()}
            ready, _, _ = select.select([self.sock, *ups], [], [], 0.2)
            for s in ready:
                if s is self.sock:
                    data, client = self.sock.recvfrom(65536)
                    self.sent += 1
                    if client not in self._up:  # one upstream socket per client (one ipmitool session)
                        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        up.connect(("127.0.0.1", self.port))
                        self._up[client] = up
                        self.sessions += 1
                    self._up[client].send(data)
                else:
                    self.sock.sendto(s.recv(65536), ups[s])

    def close(self) -> None:
        self._stop = True
        time.sleep(0.3)
        for s in (self.sock, *self._up.values()):
            s.close()


@pytest.fixture
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, Emulator]]:
    rf, im = redfish(tmp_path_factory.mktemp("rf")), ipmi(tmp_path_factory.mktemp("ipmi"))
    yield next(rf), next(im)
    for gen in (rf, im):
        for _ in gen:
            pass


def enroll(server: Server, mac: str, uuid: str) -> str:
    _, script = server.call("GET", f"/boot/ipxe?mac={mac}")
    token = script.decode().split("sledge.token=")[1].split()[0]
    body = {"enrollment_token": token, "inventory": inventory(uuid, (mac,), f"n-{mac[-2:]}").to_wire()}
    status, reply = server.call("POST", REGISTER_PATH, body)
    assert status == 200, reply
    return str(reply["machine_id"])


def bmc_calls(server: Server) -> int:
    metrics = server.call("GET", "/metrics", token=server.operator)[1].decode()
    return int(re.search(r"^sledge_bmc_requests_total (\d+)", metrics, re.M).group(1))  # type: ignore[union-attr]


def test_idle_machines_cost_their_bmc_one_status_per_interval(
    tmp_path: Path, emulators: tuple[Emulator, Emulator], capsys: pytest.CaptureFixture[str]
) -> None:
    rf, im = emulators
    relay = UdpCounter(int(im.address.rsplit(":", 1)[1]))
    server = Server(tmp_path / "data", free_port(), ("--power-poll", str(POLL)))
    server.start()
    try:
        pw = {"username": "admin", "password": PASSWORD}
        for mac, uuid, address in (
            ("52:54:00:00:00:01", "4c4c4544-0000-1000-8000-000000000001", rf.address),
            ("52:54:00:00:00:02", "4c4c4544-0000-1000-8000-000000000002", relay.address),
        ):
            machine_id = enroll(server, mac, uuid)
            status, body = server.call(
                "PUT", f"/v1/machines/{machine_id}/bmc", {"address": address, **pw}, server.operator
            )
            assert status == 201, body
        log = rf.state / "sushy.log"

        def counts() -> tuple[int, int, int, int, int]:
            text = log.read_text()
            roots = len(re.findall(r'"GET /redfish/v1/? HTTP', text))  # a Redfish call starts there
            return bmc_calls(server), roots, text.count('"GET /redfish'), relay.sessions, relay.sent

        end = time.monotonic() + 3 * POLL  # past each machine's first poll (which finds the IPMI suite)
        while [
            m["power"] for m in server.call("GET", "/v1/machines", token=server.operator)[1]["machines"]
        ] != [
            "off",
            "off",
        ]:
            assert time.monotonic() < end, "the machines were never polled"
            time.sleep(0.5)
        before = counts()
        time.sleep(WINDOW)
        calls, rf_calls, http, ipmi_calls, udp = (b - a for a, b in zip(before, counts(), strict=True))
        _, listed = server.call("GET", "/v1/machines", token=server.operator)
    finally:
        server.stop()
        relay.close()
    # two machines, one poll each per interval (jittered +-10 %, looked at every 5 s)
    most = 2 * (int(WINDOW / (0.9 * POLL)) + 1)
    assert 2 * int(WINDOW / (1.1 * POLL + 5)) <= calls <= most, calls
    assert [m["power"] for m in listed["machines"]] == ["off", "off"]
    assert rf_calls + ipmi_calls == calls and rf_calls > 0 and ipmi_calls > 0  # seen at the emulators
    per_poll_http, per_poll_udp = http / rf_calls, udp / ipmi_calls
    with capsys.disabled():
        print(
            f"\nidle, {calls} status calls for 2 machines in {WINDOW:g} s at --power-poll {POLL:g}:"
            f" Redfish {http} HTTP requests ({per_poll_http:.1f} per status), IPMI {udp} UDP datagrams"
            f" ({per_poll_udp:.1f} per status); at the default 60 s: {per_poll_http:.1f} HTTP requests"
            f" and {per_poll_udp:.1f} datagrams per machine per minute"
        )
