"""A console at the rack (issue 17 item 4): the agent's status on the VGA screen and the serial
line, and a `sledge.shell=1` root shell typed into with a USB keyboard.

One q35 machine (SeaBIOS, `-vga std`: the kernel's vgacon in text mode, no DRM module in the
image; `i8042=off`: no PS/2 keyboard, so every key comes through `qemu-xhci` + `usb-kbd`) PXE-boots
the live image from a real controller whose operator gave it `sledge.shell=1` with `sledge machine
set --kernel-args`. Its screen is read from outside through QMP: `pmemsave` of the VGA text buffer
at 0xB8000 (a character and an attribute byte per cell, 80 cells a row), its keyboard typed on
with `input-send-event`. The tests run in order on that one boot (~60-120 s under TCG here).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from lab import Controller, Vm, build_live_image  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.qemu]
BOOT = 300.0  # seconds for a boot under TCG on a busy 2-core machine
MAC = "52:54:00:17:04:01"
MiB = 1 << 20
VGA_TEXT = 0xB8000  # the text buffer; vgacon scrolls by moving the screen's start inside 32 KiB
VGA_SIZE = 0x8000
COLUMNS = 80


class Qmp:
    """QEMU's machine protocol on a unix socket: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            reply = json.loads(self.reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# US layout: the characters a test types, as QEMU key codes (shifted or not).
_PLAIN = {" ": "spc", "-": "minus", "/": "slash", ".": "dot", "=": "equal", "\n": "ret"}
_SHIFTED = {"$": "4", "(": "9", ")": "0", "*": "8", ">": "dot", "_": "minus", "|": "backslash"}


def keys(text: str) -> Iterator[tuple[str, bool]]:
    """(QEMU qcode, with shift) for each character."""
    for c in text:
        if c.islower() or c.isdigit():
            yield c, False
        elif c.isupper():
            yield c.lower(), True
        elif c in _PLAIN:
            yield _PLAIN[c], False
        else:
            yield _SHIFTED[c], True


def key_event(qcode: str, down: bool) -> dict[str, Any]:
    return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": qcode}}}


@dataclass
class Rack:
    controller: Controller
    vm: Vm
    qmp: Qmp
    work: Path
    machine_id: str = ""

    def screen(self) -> list[str]:
        """Every 80-column row of the VGA text buffer (the visible screen is 25 of them)."""
        dump = self.work / "vga.bin"
        self.qmp.execute("pmemsave", val=VGA_TEXT, size=VGA_SIZE, filename=str(dump))
        cells = dump.read_bytes()[::2]  # character bytes; the attribute bytes between them
        text = cells.decode("cp437")
        return [text[i : i + COLUMNS] for i in range(0, len(text), COLUMNS)]

    def status_rows(self) -> list[tuple[str, str, str]]:
        """The agent's three status rows wherever they are in the text buffer."""
        rows = self.screen()
        return [
            (rows[i].rstrip(), rows[i + 1].rstrip(), rows[i + 2].rstrip())
            for i in range(len(rows) - 2)
            if rows[i].startswith("sledge machine ")
        ]

    def wait_screen(self, pattern: str, timeout: float, row: int) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = self.status_rows()
            for rows in found:
                if m := regex.search(rows[row]):
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"VGA status rows never matched {pattern!r} in {timeout} s: {found}")
            time.sleep(0.5)

    def type(self, text: str, pause: float = 0.03) -> None:
        """Types on the USB keyboard (a HID report per event; the guest polls it, so not too fast)."""
        for qcode, shift in keys(text):
            down = [key_event("shift", True)] if shift else []
            up = [key_event("shift", False)] if shift else []
            for events in (down, [key_event(qcode, True)], [key_event(qcode, False)], up):
                if events:
                    self.qmp.execute("input-send-event", events=events)
                    time.sleep(pause)

    def job(self, body: dict[str, Any]) -> str:
        status, job = self.controller.call("POST", "/v1/jobs", {"machine": MAC, **body})
        assert status == 201, job
        return str(job["id"])

    def wait_job(self, job_id: str, timeout: float = BOOT) -> dict[str, Any]:
        return self.controller.wait_job(job_id, timeout)


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rack]:
    need("qemu-system-x86_64", "socat", "mmdebstrap")
    work = tmp_path_factory.mktemp("console")
    kernel, initrd = build_live_image()
    image = work / "random.img"  # incompressible, so that writing it takes the guest a while
    with open(image, "wb") as f:
        for _ in range(192):
            f.write(os.urandom(MiB))
    controller = Controller(work / "data", kernel_args="")  # the controller's default consoles
    controller.install_boot_files(kernel, initrd)
    controller.start()
    controller.import_image(image, "random", "1")
    controller.sledge("machine", "expect", MAC)
    controller.sledge("machine", "set", MAC, "--kernel-args", "sledge.shell=1")
    (work / "vm").mkdir()
    vm = Vm(work / "vm", controller.port, MAC, disk_size=256 * MiB)
    qmp_path = work / "vm" / "qmp.sock"
    vm.argv += [
        "-machine", "q35,i8042=off",
        "-vga", "std",
        "-device", "qemu-xhci,id=xhci0",
        "-device", "usb-kbd,bus=xhci0.0",
        "-qmp", f"unix:{qmp_path},server,nowait",
    ]  # fmt: skip
    qmp: Qmp | None = None
    try:
        vm.start()
        qmp = Qmp(qmp_path)
        started = time.monotonic()
        m = vm.wait_for(r"sledge-agent: registered as machine (m-[0-9a-f]+)", BOOT)
        print(f"\nq35 machine registered {time.monotonic() - started:.1f} s after power-on")
        yield Rack(controller, vm, qmp, work, m.group(1))
    finally:
        if qmp is not None:
            qmp.close()
        vm.stop()
        controller.stop()
        log = work / "vm" / "console.log"
        if log.exists():
            print(f"--- {log} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-40:]))


def test_a_the_kernel_got_the_controllers_consoles_and_the_machines_own_args(rack: Rack) -> None:
    m = rack.vm.wait_for(r"Command line: (.*)", 5)
    cmdline = m.group(1)
    assert "console=tty0 console=ttyS0,115200 sledge.shell=1" in cmdline, cmdline
    assert f"sledge.mac={MAC}" in cmdline and "sledge.token=" in cmdline, cmdline
    inputs = rack.vm.wait_for(r"sledge-init: .* input: (.*)", 5).group(1)
    assert "USB Keyboard" in inputs and "AT Translated" not in inputs, inputs  # no PS/2 keyboard


def test_b_serial_and_vga_show_machine_and_controller(rack: Rack) -> None:
    head = rf"machine {rack.machine_id} \| controller http://10\.0\.2\.100:8080"
    rack.vm.wait_for(rf"sledge-status: {head} \| job: none yet", 30)
    rack.wait_screen(rf"^sledge {head}$", 30, row=0)
    found = rack.status_rows()
    # drawn in one place only: the top of the screen, held there while everything else scrolls
    assert len(found) == 1, found
    assert found[-1][1] == "job: none yet, waiting for one" and found[-1][2].startswith("last error"), found


def test_c_a_root_shell_answers_the_usb_keyboard(rack: Rack) -> None:
    rack.vm.wait_for(r"sledge\.shell=1: root shell on /dev/tty1", 5)
    rack.vm.wait_for(r"sledge\.shell=1: root shell on /dev/ttyS0", 5)
    mark = rack.vm.mark()
    for attempt in range(10):  # the shell may not be reading yet: ask until it answers
        rack.type("echo KBD-$((6*7))-$(id -u) >/dev/ttyS0\n")
        try:
            rack.vm.wait_for(r"^KBD-42-0$", 10, since=mark)
            break
        except TimeoutError:
            if attempt == 9:
                raise
    screen = "\n".join(rack.screen())
    assert "echo KBD-$((6*7))-$(id -u) >/dev/ttyS0" in screen  # typed on tty1, echoed on the VGA


def test_d_a_failed_job_is_the_last_error_on_both_consoles(rack: Rack) -> None:
    job_id = rack.job({"kind": "erase", "params": {"disk": {"serial": "NO-SUCH-DISK"}}})
    job = rack.wait_job(job_id)
    assert job["state"] == "failed", job
    error = rf"last error \d\d:\d\d:\d\d UTC: erase {job_id} failed: disk selection: "
    rack.wait_screen(error, 30, row=2)
    rack.wait_screen(rf"^job erase {job_id} failed: disk selection", 5, row=1)
    rack.vm.wait_for(rf"sledge-status: .* \| job erase {job_id} failed: .* \| {error}", 30)


def test_e_a_deploy_shows_its_progress_while_it_writes(rack: Rack) -> None:
    mark = rack.vm.mark()
    params = {"power": "poweroff", "disk": {"name": "/dev/vda"}}  # 256 MiB: below the default 4 GiB
    job_id = rack.job({"kind": "deploy", "image": "random:1", "params": params})
    seen: set[int] = set()
    deadline = time.monotonic() + BOOT
    while time.monotonic() < deadline:
        try:
            found = rack.status_rows()
        except (OSError, ValueError, RuntimeError):  # QMP gone: the machine powered off meanwhile
            break
        for _, job, _ in found:
            if m := re.match(rf"job deploy {job_id} running (\d+)% [\d.]+ MiB/192\.0 MiB", job):
                seen.add(int(m.group(1)))
        if rack.controller.job(job_id)["state"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert rack.wait_job(job_id)["state"] == "succeeded"
    assert [p for p in seen if 0 < p < 100], (
        f"VGA showed no progress mid-write (percentages seen: {sorted(seen)})"
    )
    # The serial line is paced (a line per 5 s at most): how many show the job running depends on
    # the machine's speed. Its last one, drawn before the agent lets the machine go, does not.
    rack.vm.wait_for(
        rf"sledge-status: .* \| job deploy {job_id} succeeded 100% 192\.0 MiB/192\.0 MiB, poweroff now: ",
        30,
        since=mark,
    )
    assert rack.vm.wait_exit(BOOT) == 0  # the job's power action
