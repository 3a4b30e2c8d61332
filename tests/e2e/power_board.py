"""A QEMU machine's board for the BMC emulators: power and reset lines, and the firmware's choice
of boot device, driven by what the BMC emulator decides.

One small HTTP server on 127.0.0.1 takes the BMC emulators' word:
- `POST /chassis`: ipmi_sim's chassis-control program (`0x20 get power boot`, `0x20 set power 1`,
  `set reset 1`, `set boot pxe`) forwarded by curl; get answers `power:1` / `boot:pxe` lines.
- `PUT /notify`: sushy-tools' fake driver with `external_notifier` PUTs its system (power state
  with the pending change, boot device) on every change.

A one-time network boot is honoured the way firmware does: the next start (power on, or a reset,
which is then a cold restart of the QEMU process, since QEMU picks its boot device only at start)
is `-boot once=n,order=c`; QEMU itself boots the disk at every later reset, so the agent's reboot
after a deploy lands on the disk. The flag is consumed then (for Redfish the board also sets the
emulator's target back to Hdd: sushy-tools ignores BootSourceOverrideEnabled=Once).
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from lab import Vm  # noqa: E402


class Board:
    def __init__(self, work: Path, controller_port: int, mac: str, extra_argv: tuple[str, ...] = ()) -> None:
        self.work = work
        self.controller_port = controller_port
        self.mac = mac
        self.extra_argv = extra_argv
        self.vms: list[Vm] = []  # one per start of the QEMU process; the last is the live one
        self.log: list[str] = []  # what the board did: "on network", "on disk", "reset", "off"
        self.network_once = False  # the one-time boot flag, as the BMC set it
        self.on_consumed: Callable[[], None] | None = None  # called when the flag was used
        self._lock = threading.Lock()
        self._seen_boot = ""  # Redfish: the boot target in the last notification
        self._seen_pending: tuple[object, ...] = ()
        self._notes: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._follow, daemon=True).start()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- the lines -------------------------------------------------------------------------------

    def running(self) -> bool:
        return bool(self.vms) and self.vms[-1].proc is not None and self.vms[-1].proc.poll() is None

    def _start(self) -> None:
        once, self.network_once = self.network_once, False
        vm = Vm(self.work, self.controller_port, self.mac)
        assert vm.argv[-2:] == ["-boot", "order=nc"], vm.argv
        vm.argv[-1] = "once=n,order=c" if once else "order=c"
        vm.argv += self.extra_argv
        vm.start()
        self.vms.append(vm)
        self.log.append("on network" if once else "on disk")
        if once and self.on_consumed is not None:
            threading.Thread(target=self.on_consumed, daemon=True).start()

    def power(self, on: bool) -> None:
        with self._lock:
            if on and not self.running():
                self._start()
            elif not on and self.running():
                self.vms[-1].stop()
                self.log.append("off")

    def reset(self) -> None:
        with self._lock:
            if self.running() and not self.network_once:
                self.vms[-1].hmp("system_reset")  # warm: QEMU keeps its boot order (the disk)
                self.log.append("reset")
                return
            if self.running():
                self.vms[-1].stop()
            self._start()

    def stop(self) -> None:
        self.server.shutdown()
        with self._lock:
            for vm in self.vms:
                vm.stop()

    # -- the console across starts ---------------------------------------------------------------

    def mark(self) -> tuple[int, int]:
        with self._lock:
            return (len(self.vms) - 1, self.vms[-1].mark()) if self.vms else (0, 0)

    def wait_for(self, pattern: str, timeout: float, since: tuple[int, int] = (0, 0)) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                vms = list(self.vms)
            for index in range(since[0], len(vms)):
                lines = list(vms[index].lines)
                for line in lines[since[1] if index == since[0] else 0 :]:
                    if m := regex.search(line):
                        return m
            if time.monotonic() > deadline:
                tail = "\n".join(vms[-1].lines[-30:]) if vms else "(never powered on)"
                raise TimeoutError(
                    f"console never showed {pattern!r} in {timeout} s; board {self.log}:\n{tail}"
                )
            time.sleep(0.3)

    # -- what the BMC emulators say ----------------------------------------------------------------

    def chassis(self, words: list[str]) -> str:
        """ipmi_sim's chassis control: `ADDR get PARAM...` or `ADDR set PARAM VALUE...`."""
        if words[1:2] == ["get"]:
            out = []
            for param in words[2:]:
                if param == "power":
                    out.append(f"power:{int(self.running())}")
                elif param == "boot":
                    out.append(f"boot:{'pxe' if self.network_once else 'default'}")
            return "\n".join(out) + "\n"
        pairs = words[2:]
        for param, value in zip(pairs[::2], pairs[1::2], strict=False):
            if param == "boot":
                self.network_once = value == "pxe"
            elif param == "power":
                self.power(value == "1")
            elif param == "reset" and value == "1":
                self.reset()
        return ""

    def notified(self, system: dict[str, Any]) -> None:
        """sushy-tools' fake driver's system after a change: follow a new boot target and a new
        pending power change (it repeats the whole system on every change, so only news count)."""
        boot = str(system.get("boot_device", ""))
        if boot != self._seen_boot:
            self._seen_boot = boot
            self.network_once = boot == "Pxe"
        pending = system.get("pending_power") or {}
        key = (pending.get("power_state"), pending.get("apply_time"))
        if pending and key != self._seen_pending:
            self._seen_pending = key
            state = str(pending["power_state"])
            if "Restart" in state:
                self.reset()
            else:
                self.power(state == "On")

    def _follow(self) -> None:
        while True:
            self.notified(self._notes.get())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        board = self

        class Handler(BaseHTTPRequestHandler):
            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def _answer(self, text: str) -> None:
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self._answer(board.chassis(self._body().decode().split()))

            def do_PUT(self) -> None:
                # answered at once: the emulator waits for this inside the BMC request; the
                # board follows the notes in order in its own thread
                board._notes.put(json.loads(self._body()))
                self._answer("")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
