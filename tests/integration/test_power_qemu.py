"""A real QEMU machine behind an IPMI BMC: ipmi_sim's chassis-control script starts, stops and
resets a QEMU process (under TCG) and honours a one-time network boot (`-boot order=n` for the
next start only), as a board would. An erase job for the machine, which is off, makes sledge set
the one-time network boot and power it on through ipmitool; the machine's iPXE then fetches
sledge's boot script. (No agent image here: that the job then runs is the e2e tests' part.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.power.bmc import PowerAction
from tests.integration.test_controller_serve import MAC, Server, free_port, sledge
from tests.integration.test_power_emulators import PASSWORD, Emulator, ipmi
from tests.tools import need
from tests.unit.test_controller_kit import add_image

BOARD = """#!/bin/sh
# ipmi_sim chassis_control for a QEMU "board": power is the QEMU process being alive.
dir={dir}; shift; op=$1; shift
alive() {{ [ -f $dir/qemu.pid ] && kill -0 "$(cat $dir/qemu.pid)" 2>/dev/null; }}
start() {{
  order=c
  if [ "$(cat $dir/boot 2>/dev/null)" = pxe ]; then order=n; echo default > $dir/boot; fi
  echo "start order=$order" >> $dir/board.log
  setsid {qemu} -boot order=$order > $dir/qemu.out 2>&1 < /dev/null &
  echo $! > $dir/qemu.pid
}}
stop() {{ if alive; then kill "$(cat $dir/qemu.pid)"; echo stop >> $dir/board.log; fi; rm -f $dir/qemu.pid; }}
if [ "$op" = get ]; then
  for p in "$@"; do
    case $p in
      power) if alive; then echo power:1; else echo power:0; fi;;
      boot) echo "boot:$(cat $dir/boot 2>/dev/null || echo default)";;
    esac
  done
else
  while [ $# -gt 1 ]; do
    case $1 in
      power) if [ "$2" = 1 ]; then alive || start; else stop; fi;;
      reset) stop; start;;
      boot) echo "$2" > $dir/boot;;
    esac
    shift 2
  done
fi
"""


@pytest.fixture
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, int]]:
    need("qemu-system-x86_64", "socat", "ipmi_sim", "ipmitool")
    tmp = tmp_path_factory.mktemp("board")
    port = free_port()
    fwd = f"guestfwd=tcp:10.0.2.100:8080-cmd:socat - TCP:127.0.0.1:{port}"
    qemu = (
        "qemu-system-x86_64 -accel tcg -m 256 -display none -nodefaults -serial none"
        f" -netdev user,id=n0,restrict=on,bootfile=http://10.0.2.100:8080/boot.ipxe,'{fwd}'"
        f" -device virtio-net-pci,netdev=n0,mac={MAC}"
    )
    gen = ipmi(tmp)
    emulator = next(gen)
    script = tmp / "chassis.sh"
    script.write_text(BOARD.format(dir=tmp, qemu=qemu))
    try:
        yield emulator, port
    finally:
        pid = tmp / "qemu.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
        for _ in gen:
            pass


def boot_scripts(server: Server) -> int:
    """Boot scripts the controller has answered (its own /metrics)."""
    metrics = server.call("GET", "/metrics")[1].decode()
    return sum(
        int(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sledge_http_responses_total") and 'route="/boot/ipxe"' in line
    )


def make_deployed(server: Server, machine_id: str, agent_token: str) -> None:
    """A deploy that an agent (played here over the API) finished: the machine runs its own OS."""
    add_image(server.data / "store", "tiny", "1")
    _, job = server.call(
        "POST", "/v1/jobs", {"machine": machine_id, "kind": "deploy", "image": "tiny:1"}, server.operator
    )
    status, assignment = server.call("GET", "/v1/agent/jobs/next?wait=0", token=agent_token)
    assert status == 200 and assignment["job_id"] == job["id"], assignment
    finish = {"attempt": 1, "result": {"outcome": "succeeded", "bytes_written": 10}}
    status, _ = server.call("POST", f"/v1/agent/jobs/{job['id']}/finish", finish, agent_token)
    assert status == 200
    _, machine = server.call("GET", f"/v1/machines/{machine_id}", token=server.operator)
    assert machine["state"] == "deployed"


@pytest.mark.qemu
@pytest.mark.parametrize("start", ["off", "running its own OS"])
def test_sledge_network_boots_a_qemu_machine_through_ipmi_for_a_job(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, board: tuple[Emulator, int], start: str
) -> None:
    emulator, port = board
    server = Server(tmp_path / "data", port, ("--url", "http://10.0.2.100:8080", "--bmc-timeout", "15"))
    server.start()
    try:
        machine_id, agent_token = server.enroll()
        if start == "running its own OS":
            make_deployed(server, machine_id, agent_token)
        secret = tmp_path / "pw"
        secret.write_text(PASSWORD)
        args = (
            "machine",
            "bmc",
            machine_id,
            emulator.address,
            "--user",
            "admin",
            "--password-file",
            str(secret),
        )
        assert sledge(capsys, server, *args)[0] == 0
        rc, out, _ = sledge(capsys, server, "power", PowerAction.STATUS.value, machine_id)
        assert rc == 0 and "power off" in out
        if start == "running its own OS":
            assert sledge(capsys, server, "power", "on", machine_id)[0] == 0  # boots its disk
            expected_board = ["start order=c", "stop", "start order=n"]
            expected_steps = ["power: one-time network boot", "power: cycle"]
            command = ("deploy", machine_id, "tiny:1")
        else:
            expected_board = ["start order=n"]
            expected_steps = [
                f"power: the machine is off ({emulator.address})",
                "power: one-time network boot",
                "power: cycle",
            ]
            command = ("erase", machine_id)
        before = boot_scripts(server)  # enroll() asked for one itself
        started = time.monotonic()
        rc, out, err = sledge(capsys, server, *command)
        assert rc == 0, err
        job_id = out.strip()
        seen = 0
        while time.monotonic() - started < 90 and not seen:
            seen = boot_scripts(server) - before
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        board_log = (emulator.state / "board.log").read_text().splitlines()
        assert seen, f"the machine never asked for its boot script; board: {board_log}"
        assert board_log == expected_board  # into a one-time network boot
        assert (emulator.state / "boot").read_text().strip() == "default"  # once only
        _, job = server.call("GET", f"/v1/jobs/{job_id}", token=server.operator)
        steps = [e["message"].split(" via ")[0] for e in job["events"] if e["message"].startswith("power")]
        assert steps[: len(expected_steps)] == expected_steps, steps
        with capsys.disabled():
            print(f"\n{start}: sledge {command[0]} to the machine's boot script request: {elapsed:.1f} s")
        rc, out, _ = sledge(capsys, server, "power", "off", machine_id)
        assert rc == 0 and not (emulator.state / "qemu.pid").exists()
        assert PASSWORD not in json.dumps(job) + (tmp_path / "serve.log").read_text()
    finally:
        server.stop()
