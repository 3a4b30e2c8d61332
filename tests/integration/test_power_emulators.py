"""Power through real BMC emulators on 127.0.0.1: sushy-tools' Redfish emulator (its fake
driver) through sushy, and OpenIPMI's ipmi_sim (with a chassis-control script that keeps the
power and boot device in files) through ipmitool. The controller runs as in production
(make_app with the real drivers); only the machines behind the BMCs are imaginary here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from controller.jobs import JobState, MachineState
from tests.tools import need
from tests.unit.test_controller_kit import AioClient, Harness, start

PASSWORD = "Planted-Secret-77"
SYSTEM = "27946b59-9e44-4fa7-8e91-f3527a1ef094"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Emulator:
    address: str
    proc: subprocess.Popen[bytes]
    state: Path

    def boot_device(self) -> str:
        """What the machine would boot next, as the emulator holds it."""
        if self.address.startswith("ipmi"):
            return (self.state / "boot").read_text().strip() if (self.state / "boot").exists() else "default"
        import urllib.request

        url = self.address.replace("redfish://", "http://")
        request = urllib.request.Request(url)
        import base64

        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            return str(json.load(r)["Boot"]["BootSourceOverrideTarget"]).lower()


def _wait_port(port: int, proc: subprocess.Popen[bytes], udp: bool = False) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"emulator exited with {proc.returncode}"
        if udp:
            time.sleep(0.5)  # ipmi_sim binds at once; give it a moment to read its files
            return
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"emulator on port {port} did not come up")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def redfish(tmp: Path, notify_url: str = "") -> Iterator[Emulator]:
    """notify_url: the fake driver PUTs the system there on every change (sushy-tools'
    external notifier), for a board that makes a real machine follow it (tests/e2e)."""
    import bcrypt

    port = free_port()
    (tmp / "htpasswd").write_text(f"admin:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    (tmp / "sushy.conf").write_text(
        "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        # its own state: by default the fake driver keeps systems in one sqlite file for every
        # emulator on the host, so a system would start as an earlier run left it
        f"SUSHY_EMULATOR_STATE_DIR = {str(tmp / 'sushy-state')!r}\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(tmp / 'htpasswd')!r}\n"
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': {SYSTEM!r}, 'name': 'node0', 'power_state': 'Off',"
        f" 'external_notifier': {bool(notify_url)},"
        " 'nics': [{'mac': '52:54:00:00:00:01', 'ip': '10.0.2.15'}]}]\n"
        + (f"EXTERNAL_NOTIFICATION_URL = {notify_url!r}\n" if notify_url else "")
    )
    emulator = Path(sys.executable).with_name("sushy-emulator")
    log = (tmp / "sushy.log").open("wb")
    proc = subprocess.Popen(
        [str(emulator), "--config", str(tmp / "sushy.conf"), "-i", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, proc)
        yield Emulator(f"redfish://127.0.0.1:{port}/redfish/v1/Systems/{SYSTEM}", proc, tmp)
    finally:
        _stop(proc)
        log.close()


CHASSIS = """#!/bin/sh
# ipmi_sim's chassis_control: ADDR get|set PARAM [VALUE]...; power and boot device kept in files
dir={dir}; shift; op=$1; shift
if [ "$op" = get ]; then
  for p in "$@"; do
    case $p in
      power) echo "power:$(cat $dir/power 2>/dev/null || echo 0)";;
      boot) echo "boot:$(cat $dir/boot 2>/dev/null || echo default)";;
    esac
  done
else
  while [ $# -gt 1 ]; do
    case $1 in
      power) echo "$2" > $dir/power;;
      reset) echo 1 > $dir/power;;
      boot) echo "$2" > $dir/boot;;
    esac
    shift 2
  done
fi
"""


def ipmi(tmp: Path, chassis: str = "", lan_extra: str = "") -> Iterator[Emulator]:
    """chassis: the chassis-control program's text (default: power and boot device in files);
    lan_extra: more lan.conf lines for the BMC (e.g. a `serial` VM port for QEMU)."""
    need("ipmi_sim", "ipmitool")
    port = free_port(socket.SOCK_DGRAM)
    script = tmp / "chassis.sh"
    script.write_text(chassis or CHASSIS.format(dir=tmp))
    script.chmod(0o755)
    auths = "none md2 md5 straight"
    (tmp / "lan.conf").write_text(
        'name "sledge-test"\nset_working_mc 0x20\n  startlan 1\n'
        f"    addr 127.0.0.1 {port}\n    priv_limit admin\n"
        + "".join(f"    allowed_auths_{p} {auths}\n" for p in ("callback", "user", "operator", "admin"))
        + "    guid a123456789abcdefa123456789abcdef\n  endlan\n"
        f'  chassis_control "{script} 0x20"\n'
        f'  user 2 true "admin" "{PASSWORD}" admin 10 {auths}\n' + lan_extra
    )
    (tmp / "sim.emu").write_text(
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n"
        "mc_enable 0x20\n"
    )
    (tmp / "sim-state").mkdir()
    log = (tmp / "ipmi_sim.log").open("wb")
    proc = subprocess.Popen(
        [
            "ipmi_sim",
            "-c",
            str(tmp / "lan.conf"),
            "-f",
            str(tmp / "sim.emu"),
            "-s",
            str(tmp / "sim-state"),
            "-n",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, udp=True)
        yield Emulator(f"ipmi://127.0.0.1:{port}", proc, tmp)
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(params=["redfish", "ipmi"])
def bmc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    tmp = tmp_path_factory.mktemp(request.param)
    yield from (redfish if request.param == "redfish" else ipmi)(tmp)


async def power(h: Harness, machine_id: str, action: str) -> tuple[int, dict[str, object]]:
    r = await h.client.post(f"/v1/machines/{machine_id}/power", json={"action": action}, headers=h.op)
    return r.status, await r.json()


async def wait_power(h: Harness, machine_id: str, want: str, seconds: float = 20.0) -> None:
    """The Redfish emulator applies a change 1-11 s after it is asked, as real hardware might."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, body = await power(h, machine_id, "status")
        assert status == 200, body
        if body["power"] == want:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"power of {machine_id}: expected {want}, still {body['power']} after {seconds} s")


async def set_bmc(h: Harness, machine_id: str, address: str, password: str = PASSWORD) -> int:
    body = {"address": address, "username": "admin", "password": password}
    r = await h.client.put(f"/v1/machines/{machine_id}/bmc", json=body, headers=h.op)
    assert PASSWORD not in await r.text()
    return r.status


def deployed(h: Harness, machine_id: str) -> None:
    with h.store.transaction() as tx:
        m = tx.machine(machine_id)
        assert m is not None
        tx.put_machine(replace(m, state=MachineState.DEPLOYED))


async def test_power_and_one_time_network_boot_through_each_protocol(
    aiohttp_client: AioClient, tmp_path: Path, bmc: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h = await start(aiohttp_client, tmp_path, bmc_timeout=15.0, boot_deadline=60.0)
    machine_id = await h.enroll("52:54:00:00:00:01")
    assert await set_bmc(h, machine_id, bmc.address) == 201
    status, body = await power(h, machine_id, "on")
    assert status == 200 and body["power"] == "on", body
    await wait_power(h, machine_id, "on")
    status, body = await power(h, machine_id, "off")
    assert status == 200, body
    await wait_power(h, machine_id, "off")

    # a re-image of a machine running its own OS: network boot once, cycle, wait for the agent
    deployed(h, machine_id)
    job = await h.create_job(machine_id, "erase")
    end = time.monotonic() + 30
    while time.monotonic() < end:
        events = [
            e["message"]
            for e in (await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json())["events"]
        ]
        if any("waiting" in m for m in events):
            break
        await asyncio.sleep(0.2)
    assert [m.split(" via ")[0] for m in events if m.startswith("power")] == [
        "power: one-time network boot",
        "power: cycle",
        "power: waiting up to 60 s for the agent",
    ], events
    assert bmc.boot_device() == "pxe"
    await wait_power(h, machine_id, "on")
    assert await h.claim(machine_id) is not None  # the agent came up and took the job
    assert (await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json())["state"] == "running"

    # the password is nowhere: API answers, events, logs, the database
    answers = [
        await (await h.client.get(path, headers=h.op)).text()
        for path in (
            f"/v1/machines/{machine_id}",
            "/v1/machines",
            f"/v1/machines/{machine_id}/bmc",
            "/v1/events",
        )
    ]
    answers.append(await (await h.client.get("/metrics")).text())
    assert all(PASSWORD not in a for a in answers)
    assert PASSWORD not in caplog.text
    for f in h.config.data_dir.parent.rglob("state.db*"):
        assert PASSWORD.encode() not in f.read_bytes()
    machines = json.loads(answers[1])["machines"]
    assert machines[0]["power"] == "on"


async def test_wrong_credentials_name_the_bmc(
    aiohttp_client: AioClient, tmp_path: Path, bmc: Emulator
) -> None:
    h = await start(aiohttp_client, tmp_path, bmc_timeout=15.0)
    machine_id = await h.enroll("52:54:00:00:00:01")
    assert await set_bmc(h, machine_id, bmc.address, password="not-the-password") == 201
    status, body = await power(h, machine_id, "status")
    assert status == 502, body
    error = str(body["error"])
    assert error.startswith(f"BMC {bmc.address}: power status: ")
    assert (
        ("401" in error or "password" in error) if bmc.address.startswith("redfish") else "session" in error
    )
    assert "not-the-password" not in json.dumps(body)
    shown = await (await h.client.get(f"/v1/machines/{machine_id}/bmc", headers=h.op)).json()
    assert shown["power"] == "unknown" and shown["power_error"] in error


@pytest.mark.parametrize("protocol", ["redfish", "ipmi"])
async def test_an_unreachable_bmc_fails_the_job_and_leaves_the_machine_as_it_was(
    aiohttp_client: AioClient, tmp_path: Path, protocol: str
) -> None:
    if protocol == "ipmi":
        need("ipmitool")
    # nobody answers there: a UDP port with no listener, a TCP port nobody accepts on (10.0.0.0/8
    # would leave the machine; 127.0.0.1 keeps the test on loopback)
    port = free_port(socket.SOCK_DGRAM if protocol == "ipmi" else socket.SOCK_STREAM)
    address = (
        f"ipmi://127.0.0.1:{port}"
        if protocol == "ipmi"
        else f"redfish://127.0.0.1:{port}/redfish/v1/Systems/1"
    )
    h = await start(aiohttp_client, tmp_path, bmc_timeout=3.0, boot_deadline=5.0)
    machine_id = await h.enroll("52:54:00:00:00:01")
    assert await set_bmc(h, machine_id, address) == 201
    deployed(h, machine_id)
    started = time.monotonic()
    job = await h.create_job(machine_id, "erase")
    while time.monotonic() - started < 20:
        shown = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
        if shown["state"] != "queued":
            break
        await asyncio.sleep(0.2)
    assert shown["state"] == JobState.FAILED.value
    assert shown["reason"].startswith(f"BMC {address}: set one-time network boot: "), shown["reason"]
    assert time.monotonic() - started < 10  # within its deadline (3 s per request), not hung
    machine = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert machine["state"] == "deployed" and machine["bmc"]["power"] == "unknown"
    assert await h.claim(machine_id) is None  # nothing left for a late agent
    assert PASSWORD not in json.dumps(shown) + json.dumps(machine)
