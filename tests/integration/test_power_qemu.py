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


@pytest.mark.qemu
def test_a_machine_that_is_off_is_network_booted_by_sledge_through_ipmi(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, board: tuple[Emulator, int]
) -> None:
    emulator, port = board
    server = Server(tmp_path / "data", port, ("--url", "http://10.0.2.100:8080", "--bmc-timeout", "15"))
    server.start()
    try:
        machine_id, _ = server.enroll()
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

        def boot_scripts() -> int:
            metrics = server.call("GET", "/metrics")[1].decode()
            return sum(
                int(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("sledge_http_responses_total") and 'route="/boot/ipxe"' in line
            )

        before = boot_scripts()  # enroll() asked for one itself
        started = time.monotonic()
        rc, out, err = sledge(capsys, server, "erase", machine_id)
        assert rc == 0, err
        job_id = out.strip()
        seen = 0
        while time.monotonic() - started < 90 and not seen:
            seen = boot_scripts() - before
            time.sleep(1)
        elapsed = time.monotonic() - started
        board_log = (emulator.state / "board.log").read_text()
        assert seen, f"the machine never asked for its boot script; board: {board_log}"
        assert board_log.splitlines()[0] == "start order=n"  # powered on into a one-time network boot
        assert (emulator.state / "boot").read_text().strip() == "default"  # once only
        _, job = server.call("GET", f"/v1/jobs/{job_id}", token=server.operator)
        steps = [e["message"].split(" via ")[0] for e in job["events"] if e["message"].startswith("power")]
        assert steps[:3] == [
            "power: the machine is off (" + emulator.address + ")",
            "power: one-time network boot",
            "power: cycle",
        ]
        with capsys.disabled():
            print(
                f"\nsledge erase to the machine's boot script request: {elapsed:.1f} s; board: {board_log!r}"
            )
        rc, out, _ = sledge(capsys, server, "power", "off", machine_id)
        assert rc == 0 and not (emulator.state / "qemu.pid").exists()
        assert PASSWORD not in json.dumps(job) + (tmp_path / "serve.log").read_text()
    finally:
        server.stop()
