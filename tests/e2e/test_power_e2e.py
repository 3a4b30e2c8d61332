"""A deployed machine re-imaged by one command with nobody touching it, through each BMC protocol.

A QEMU machine (TCG) runs image v1 from its disk. `sledge deploy MAC demo:v2` makes sledge set a
one-time network boot and power-cycle it through the BMC; the board (tests/e2e/power_board.py)
restarts it into the network boot, the agent writes v2 and reboots, the machine boots v2 from its
disk: the marker on its serial console. The BMCs are the real emulators:
- IPMI: OpenIPMI's ipmi_sim, reached by sledge's ipmitool over RMCP+ on 127.0.0.1, connected to
  the machine's `ipmi-bmc-extern` device (a KCS BMC in the guest) over the VM protocol; its
  chassis-control program is the board's power, reset and boot-flag lines.
- Redfish: sushy-tools' emulator (fake driver) through sushy; its external notifier tells the
  board each power change and boot target (sushy-tools' libvirt driver would need a libvirt
  daemon; see docs/power.md).
Also the first power-on of a machine that is off (by the operator at the BMC: one-time network
boot + power on) and `sledge deploy` of the machine, which is then on and runs the agent; and,
through IPMI, the BMC address the agent reads over the guest's KCS interface (`ipmitool lan print`
in the live image), which the controller offers only as a suggestion.

SLEDGE_POWER_ROUNDS=3 re-images it three times (v2, v1, v2) for the median in docs/power.md.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.power.address import parse
from controller.power.bmc import Bmc
from controller.power.service import connect
from controller.state.model import PowerState
from tests.e2e.power_board import REPO, Board
from tests.integration.test_power_emulators import PASSWORD, Emulator, free_port, ipmi, redfish
from tests.tools import need

sys.path.insert(0, str(REPO / "scripts"))

from lab import Controller, build_demo_image, build_live_image

pytestmark = [pytest.mark.root, pytest.mark.qemu]
MAC = "52:54:00:e2:e0:14"
BMC_LAN_ADDRESS = "192.0.2.17"  # what ipmi_sim's LAN channel 1 reports (TEST-NET-1: never dialled)
BOOT = 420.0  # seconds for a boot and a deploy under TCG on a busy 2-core machine (seen: 228 s)
ROUNDS = int(os.environ.get("SLEDGE_POWER_ROUNDS", "1"))


@dataclass
class Rig:
    protocol: str
    controller: Controller
    board: Board
    emulator: Emulator
    work: Path

    def sledge(self, *args: str) -> str:
        done = self.controller.sledge(*args, check=False)
        assert done.returncode == 0, f"sledge {' '.join(args)}: {done.stderr}"
        return done.stdout

    def wait_job(self, job_id: str, timeout: float = BOOT) -> dict[str, Any]:
        return self.controller.wait_job(job_id, timeout)


def set_lan_address(emulator: Emulator, address: str) -> None:
    """Give ipmi_sim's LAN channel 1 a static address, as an operator configures a BMC (ipmi_sim
    reports 0.0.0.0 until then: its `addr` line is only where it listens)."""
    host, port = emulator.address.removeprefix("ipmi://").rsplit(":", 1)
    base = ["ipmitool", "-I", "lanplus", "-H", host, "-p", port, "-U", "admin", "-E", "lan", "set", "1"]
    for args in (["ipsrc", "static"], ["ipaddr", address]):
        done = subprocess.run(
            base + args,
            env={**os.environ, "IPMI_PASSWORD": PASSWORD},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"ipmitool lan set 1 {' '.join(args)}: {done.stderr}"


def clear_boot_override(emulator: Emulator) -> None:
    """What a BMC does after the one-time boot it was asked for: back to the disk (sushy-tools
    reports every override as Continuous and keeps it, so the board's firmware clears it)."""
    url = emulator.address.replace("redfish://", "http://")
    body = json.dumps({"Boot": {"BootSourceOverrideTarget": "Hdd"}}).encode()
    request = urllib.request.Request(url, data=body, method="PATCH")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10):
        pass


@pytest.fixture(scope="module")
def images() -> tuple[Path, Path, Path, Path]:
    need("qemu-system-x86_64", "socat", "mmdebstrap", "extlinux", "curl")
    kernel, initrd = build_live_image()
    return kernel, initrd, build_demo_image("v1"), build_demo_image("v2")


@pytest.fixture(params=["ipmi", "redfish"])
def rig(
    request: pytest.FixtureRequest,
    images: tuple[Path, Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    protocol = str(request.param)
    kernel, initrd, v1, v2 = images
    work = tmp_path_factory.mktemp(f"power-{protocol}")
    controller = Controller(
        work / "data", lease=30.0, extra=("--boot-deadline", str(BOOT), "--bmc-timeout", "15")
    )
    controller.install_boot_files(kernel, initrd)
    controller.start()
    for image, version in ((v1, "v1"), (v2, "v2")):
        controller.import_image(image, "demo", version)
    (work / "vm").mkdir()
    bmc_dir = tmp_path_factory.mktemp(f"bmc-{protocol}")
    if protocol == "ipmi":
        vm_port = free_port()
        board = Board(
            work / "vm",
            controller.port,
            MAC,
            (
                "-chardev",
                f"socket,id=ipmi0,host=127.0.0.1,port={vm_port},reconnect=10",
                "-device",
                "ipmi-bmc-extern,id=bmc0,chardev=ipmi0",
                "-device",
                "isa-ipmi-kcs,bmc=bmc0",
            ),
        )
        chassis = f'#!/bin/sh\nexec curl -sS --max-time 60 --data-binary "$*" {board.url}/chassis\n'
        emulators = ipmi(bmc_dir, chassis, f"  serial 15 127.0.0.1 {vm_port} codec VM\n")
    else:
        board = Board(work / "vm", controller.port, MAC)
        emulators = redfish(bmc_dir, f"{board.url}/notify")
    emulator = next(emulators)
    if protocol == "redfish":
        board.on_consumed = lambda: clear_boot_override(emulator)
    try:
        yield Rig(protocol, controller, board, emulator, work)
    finally:
        board.stop()
        for _ in emulators:
            pass
        controller.stop()
        log = work / "vm" / "console.log"
        if log.exists():
            print(f"--- {log} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-40:]))
        shutil.rmtree(work / "vm", ignore_errors=True)  # a 4 GiB sparse disk per protocol


def test_a_deployed_machine_is_reimaged_by_one_command_through_its_bmc(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    board, address = rig.board, rig.emulator.address

    # Racked and off: the operator powers it on at the BMC into a network boot; sledge discovers it.
    def bmc() -> Bmc:  # a driver lives for one call (the Redfish one keeps what it read)
        return connect(parse(address), "admin", PASSWORD, 20.0)

    if rig.protocol == "ipmi":
        set_lan_address(rig.emulator, BMC_LAN_ADDRESS)
    bmc().boot_from_network_once()
    bmc().power_on()
    board.wait_for(r"sledge-agent: registered as machine", BOOT)
    assert board.log == ["on network"]

    # The agent read its BMC's address over the guest's KCS interface (ipmi_si + ipmi_devintf,
    # ipmitool in the live image); the controller offers it and sets nothing up by itself.
    status, shown = rig.controller.call("GET", f"/v1/machines/{MAC}")
    suggested = BMC_LAN_ADDRESS if rig.protocol == "ipmi" else None  # no IPMI device under Redfish
    assert status == 200 and shown["inventory"]["bmc_address"] == suggested, shown["inventory"]
    assert shown["bmc_suggested"] == suggested and shown["bmc"] is None, shown
    assert not [e for e in shown["events"] if "bmc" in e["message"].lower()], shown["events"]
    text = rig.sledge("machine", "show", MAC)
    assert ("the agent found " + BMC_LAN_ADDRESS in text) == (rig.protocol == "ipmi"), text
    end = time.monotonic() + 30  # the Redfish emulator applies a power change 1-11 s after it
    while bmc().power_state() is not PowerState.ON:
        assert time.monotonic() < end, "the BMC never reported the machine on"
        time.sleep(0.5)
    secret = rig.work / "bmc-password"
    secret.write_text(PASSWORD + "\n")
    rig.sledge("machine", "bmc", MAC, address, "--user", "admin", "--password-file", str(secret))

    # v1: the machine is on and runs the agent, so sledge leaves its power alone.
    job = rig.wait_job(rig.sledge("deploy", MAC, "demo:v1").strip())
    assert job["state"] == "succeeded", job
    board.wait_for(r"SLEDGE-DEMO-IMAGE-BOOTED v1", BOOT)
    assert not [e for e in job["events"] if e["message"].startswith("power")], job["events"]
    assert board.log == ["on network"]  # the agent's reboot was QEMU's own reset, onto the disk
    machine = rig.controller.machine(MAC)
    assert machine is not None and machine["state"] == "deployed"

    # Re-image: one command, nobody touching the machine.
    times: list[float] = []
    agent_up: list[float] = []  # of which the agent was up and registered after
    for round_ in range(ROUNDS):
        version = "v2" if round_ % 2 == 0 else "v1"
        mark, starts = board.mark(), len(board.log)
        started = time.monotonic()
        job_id = rig.sledge("deploy", MAC, f"demo:{version}").strip()
        board.wait_for(r"sledge-agent: registered as machine", BOOT, since=mark)
        agent_up.append(time.monotonic() - started)
        board.wait_for(rf"SLEDGE-DEMO-IMAGE-BOOTED {version}", BOOT, since=mark)
        times.append(time.monotonic() - started)
        job = rig.wait_job(job_id)
        assert job["state"] == "succeeded", job
        steps = [e["message"].split(" via ")[0] for e in job["events"] if e["message"].startswith("power")]
        assert steps[:2] == ["power: one-time network boot", "power: cycle"], steps
        assert steps[2].startswith(f"power: waiting up to {BOOT:g} s for the agent"), steps
        # the board restarted it once into the network boot, and the agent's reboot reached the disk
        assert board.log[starts:] == ["on network"], board.log
        assert len(board.vms) == mark[0] + 2 and not board.network_once
        if rig.protocol == "redfish":
            end = time.monotonic() + 10
            while rig.emulator.boot_device() != "hdd":
                assert time.monotonic() < end, f"boot override still {rig.emulator.boot_device()}"
                time.sleep(0.2)
        machine = rig.controller.machine(MAC)
        assert machine is not None and machine["state"] == "deployed"

    with capsys.disabled():
        shown = ", ".join(f"{t:.1f} (agent up at {a:.1f})" for t, a in zip(times, agent_up, strict=True))
        print(
            f"\n{rig.protocol}: sledge deploy on a running machine to the new image booted:"
            f" {shown} s (median {statistics.median(times):.1f} s)"
        )
    if rig.protocol == "redfish":
        # The listing shows the power state as last polled: sushy-tools applies a change 1-11 s
        # after it, so a poll in that window saw the cycle's "off" (seen once in CI), shown until the
        # next poll (60 s). Ask now, as an operator would: the machine is on, and the listing says so.
        assert ": power on (" in rig.sledge("power", "status", MAC)
    status, machines = rig.controller.call("GET", "/v1/machines")
    assert status == 200 and [m["power"] for m in machines["machines"]] in (["on"], ["unknown"], [None])
    answers = json.dumps(machines) + json.dumps(rig.controller.call("GET", f"/v1/machines/{MAC}")[1])
    answers += json.dumps(rig.controller.call("GET", "/v1/jobs")[1]) + json.dumps(job)
    answers += str(rig.controller.call("GET", "/v1/events")[1]) + str(
        rig.controller.call("GET", "/metrics")[1]
    )
    for text in (answers, (rig.controller.data / "serve.log").read_text(), "\n".join(board.log)):
        assert PASSWORD not in text
    assert all(PASSWORD not in line for vm in board.vms for line in vm.lines)
