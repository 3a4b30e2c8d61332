"""A lab on this machine: a controller on loopback and QEMU machines that PXE-boot from it.

Used by scripts/demo and by the end-to-end tests (tests/e2e). Guests reach the
controller as http://10.0.2.100:8080 through QEMU user networking (restrict=on:
no other address is reachable), forwarded by socat to 127.0.0.1:PORT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
GUEST_URL = "http://10.0.2.100:8080"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Controller:
    """`sledge serve` on 127.0.0.1, telling agents to use the guest-side URL."""

    data: Path
    port: int = field(default_factory=free_port)
    lease: float = 60.0
    extra: tuple[str, ...] = ()  # more `sledge serve` options (--boot-deadline...)
    kernel_args: str = "console=ttyS0,115200 quiet loglevel=3"  # "": the controller's default
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        log = open(self.data / "serve.log", "ab")  # noqa: SIM115 - the child owns it
        cmd = [
            str(VENV_BIN / "sledge"),
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data",
            str(self.data),
            "--url",
            GUEST_URL,
            "--lease",
            str(self.lease),
            *self.extra,
        ]
        if self.kernel_args:
            cmd += ["--kernel-args", self.kernel_args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        "sledge serve exited:\n" + (self.data / "serve.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)
        raise RuntimeError("sledge serve did not answer /healthz within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def operator(self) -> str:
        return (self.data / "operator.token").read_text().strip()

    def call(self, method: str, path: str, body: object = None, token: str | None = "") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        token = self.operator if token == "" else token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                raw = r.read()
                kind = r.headers.get("Content-Type", "")
                return r.status, json.loads(raw) if raw and kind.startswith("application/json") else raw
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw

    def sledge(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The operator CLI against this controller."""
        cmd = [str(VENV_BIN / "sledge"), *args, "--controller", self.url, "--data", str(self.data)]
        return subprocess.run(cmd, text=True, capture_output=True, check=check)

    def install_boot_files(self, kernel: Path, initrd: Path) -> None:
        boot = self.data / "boot"
        boot.mkdir(parents=True, exist_ok=True)
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
            dest = boot / name
            if not dest.exists() or dest.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, dest)

    def import_image(self, src: Path, name: str, version: str) -> str:
        out = subprocess.run(
            [
                str(VENV_BIN / "sledge"),
                "image",
                "import",
                str(src),
                "--name",
                name,
                "--version",
                version,
                "--chunk-size",
                "1M",
                "--store",
                str(self.data / "store"),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().splitlines()[-1]

    def machine(self, mac: str) -> dict[str, Any] | None:
        status, body = self.call("GET", "/v1/machines")
        if status != 200:
            return None
        for m in body.get("machines", []):
            if mac in m.get("macs", []):
                return dict(m)
        return None

    def job(self, job_id: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/v1/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"job {job_id}: HTTP {status}: {body}")
        return dict(body)

    def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        """The job once it has ended (succeeded, failed or cancelled); AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['state']} after {timeout} s")

    def bytes_served(self) -> int:
        """Chunk and manifest bytes the controller has sent (from /metrics)."""
        _, text = self.call("GET", "/metrics", token=None)
        total = 0
        for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
            if line.startswith("sledge_bytes_served_total"):
                total += int(float(line.split()[-1]))
        return total


class Vm:
    """A QEMU machine (TCG) with a virtio NIC that PXE-boots from the lab's controller and a virtio disk.

    Its serial console is read line by line; wait_for() waits for a line to match.
    """

    def __init__(
        self,
        workdir: Path,
        controller_port: int,
        mac: str,
        disk_size: int = 4 << 30,
        echo: Callable[[str], None] | None = None,
        memory: int = 1024,
        firmware: str = "bios",
        ssh_port: int = 0,
    ) -> None:
        """firmware: "bios" (SeaBIOS) or "uefi" (OVMF, q35, a fresh copy of the variables per
        workdir); ssh_port: forward 127.0.0.1:ssh_port to the guest's port 22 (0: none)."""
        self.workdir = workdir
        self.mac = mac
        self.disk = workdir / "disk.img"
        if not self.disk.exists():
            with open(self.disk, "wb") as f:
                f.truncate(disk_size)
        self.monitor = workdir / "monitor.sock"
        self.lines: list[str] = []
        self.echo = echo
        self._cond = threading.Condition()
        self._log = open(workdir / "console.log", "a")  # noqa: SIM115 - closed in stop()
        fwd = f"guestfwd=tcp:10.0.2.100:8080-cmd:socat - TCP:127.0.0.1:{controller_port}"
        if ssh_port:
            fwd += f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
        board = ["-boot", "order=nc"]
        if firmware == "uefi":
            # The boot order through bootindex (OVMF ignores -boot order): network, then disk.
            # No PXE/HTTP boot of OVMF's own: the NIC's iPXE ROM is the network entry, and after
            # iPXE's `exit` OVMF would otherwise try each of those first (minutes under TCG).
            board = ovmf_board(workdir, {"IPv4PXESupport": "no", "IPv6PXESupport": "no"})
        elif firmware != "bios":
            raise ValueError(f"firmware {firmware!r}: expected bios or uefi")
        nic_index, disk_index = (",bootindex=1", ",bootindex=2") if firmware == "uefi" else ("", "")
        self.argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64,+rdrand",
            "-m",
            str(memory),
            "-smp",
            "1",
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            f"unix:{self.monitor},server,nowait",
            "-netdev",
            f"user,id=n0,restrict=on,{fwd},bootfile={GUEST_URL}/boot.ipxe",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={mac}{nic_index}",
            "-drive",
            f"file={self.disk},if=none,id=d0,format=raw,cache=unsafe,discard=unmap",
            "-device",
            f"virtio-blk-pci,drive=d0{disk_index}",
            *board,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", raw.decode(errors="replace")).rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                self._log.write(line + "\n")
                self._log.flush()
                self._cond.notify_all()
            if self.echo and line.strip():
                self.echo(line)
        with self._cond:
            self._cond.notify_all()

    def mark(self) -> int:
        """A position in the console, to wait for lines printed after it."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    tail = "\n".join(self.lines[-30:])
                    state = "QEMU exited" if self.proc and self.proc.poll() is not None else f"{timeout} s"
                    raise TimeoutError(f"console never showed {pattern!r} ({state}); last lines:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def hmp(self, command: str) -> None:
        """A QEMU monitor command (system_reset, quit...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.monitor))
            s.sendall(command.encode() + b"\n")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()


def ovmf_board(workdir: Path, knobs: dict[str, str]) -> list[str]:
    """QEMU arguments of a UEFI machine: q35, OVMF's code read-only and a fresh copy of its
    variables per machine (kept across reboots in `workdir`), and OVMF's fw_cfg `knobs`
    (opt/org.tianocore/NAME=VALUE)."""
    vars_copy = workdir / "OVMF_VARS.fd"
    if not vars_copy.exists():
        shutil.copyfile(OVMF_VARS, vars_copy)
    argv = [
        "-machine", "q35",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]  # fmt: skip
    for name, value in knobs.items():
        argv += ["-fw_cfg", f"name=opt/org.tianocore/{name},string={value}"]
    return argv


def build_live_image() -> tuple[Path, Path]:
    """The agent's kernel and initramfs (built once, then cached by the script)."""
    subprocess.run([str(REPO / "scripts" / "build-initramfs")], check=True, stdout=sys.stderr)
    out = REPO / "build" / "initramfs"
    return out / "vmlinuz", out / "initramfs.zst"


def build_os_image() -> Path:
    """The Debian 12 cloud image (qcow2; built once, then cached by the script)."""
    subprocess.run([str(REPO / "scripts" / "build-os-image")], check=True, stdout=sys.stderr)
    return REPO / "build" / "os-image" / "debian-12.qcow2"


def build_demo_image(version: str) -> Path:
    out = REPO / "build" / "demo" / f"demo-{version}.img"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                str(REPO / "scripts" / "build-demo-image"),
                str(out),
                "--marker",
                f"SLEDGE-DEMO-IMAGE-BOOTED {version}",
            ],
            check=True,
            stdout=sys.stderr,
        )
    return out
