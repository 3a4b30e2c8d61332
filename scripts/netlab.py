"""A provisioning L2 on this machine: a network namespace with a bridge, the controller and its
dnsmasq listening on it, QEMU machines on tap devices that boot through DHCP, TFTP and iPXE.

Nothing leaves the namespace. Processes started inside are ended by their PIDs, then the
namespaces are deleted, even when the caller failed. Used by tests/e2e/test_netboot.py,
tests/integration/test_boot_dnsmasq.py and scripts/demo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import VENV_BIN, Controller, Vm, ovmf_board

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
PORT = 8470


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Lan:
    """Namespace `ns` holding bridge `br0` at `address` (e.g. 10.77.0.1/24)."""

    address: str = "10.77.0.1/24"
    ns: str = field(default_factory=lambda: f"sl-{uuid.uuid4().hex[:8]}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    taps: int = 0

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    def up(self) -> Lan:
        sh("ip", "netns", "add", self.ns)
        self.namespaces.append(self.ns)
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "link", "add", "br0", "type", "bridge")
        self.run("ip", "addr", "add", self.address, "dev", "br0")
        # an IPv6 prefix too, so dnsmasq sends router adverts and iPXE need not wait for one
        self.run("ip", "addr", "add", "fd77::1/64", "dev", "br0", "nodad")
        self.run("ip", "link", "set", "br0", "up")
        return self

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], check=check, capture_output=True, text=True
        )

    def spawn(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """A process inside the namespace, in its own session so it ends with its children."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.ns, *argv], start_new_session=True, **kw
        )
        self.procs.append(proc)
        return proc

    def tap(self) -> str:
        """A tap device on the bridge, for a QEMU NIC (-netdev tap,ifname=...)."""
        name = f"tap{self.taps}"
        self.taps += 1
        self.run("ip", "tuntap", "add", name, "mode", "tap")
        self.run("ip", "link", "set", name, "master", "br0")
        self.run("ip", "link", "set", name, "up")
        return name

    def client(self, name: str) -> str:
        """Another namespace wired to the bridge by a veth pair (its end is `eth0`): a host on the LAN."""
        ns = f"{self.ns}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        port = f"v{name}"[:15]
        self.run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.run("ip", "link", "set", port, "master", "br0")
        self.run("ip", "link", "set", port, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        return ns

    def down(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                except ProcessLookupError:
                    pass
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self.namespaces.clear()


class NetController(Controller):
    """`sledge serve` inside the namespace, on the bridge's address, running its dnsmasq.

    The host cannot reach the namespace (by design), so calls go through curl inside it.
    """

    def __init__(
        self,
        data: Path,
        lan: Lan,
        dhcp: Sequence[str],
        lease: float = 60.0,
        kernel_args: str = "console=ttyS0,115200 quiet loglevel=3",
    ) -> None:
        super().__init__(data, port=PORT, lease=lease)
        self.lan = lan
        self.dhcp = list(dhcp)
        self.kernel_args = kernel_args

    @property
    def url(self) -> str:
        return f"http://{self.lan.ip}:{self.port}"

    @property
    def log(self) -> Path:
        return self.data / "serve.log"

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = self.lan.spawn(
                [
                    str(VENV_BIN / "sledge"),
                    "serve",
                    "--listen",
                    f"{self.lan.ip}:{self.port}",
                    "--data",
                    str(self.data),
                    "--lease",
                    str(self.lease),
                    "--kernel-args",
                    self.kernel_args,
                    *self.dhcp,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.call("GET", "/healthz", token=None)[0] == 200:
                return
            if self.proc.poll() is not None:
                raise RuntimeError("sledge serve exited:\n" + self.log.read_text()[-2000:])
            time.sleep(0.2)
        raise RuntimeError("sledge serve did not answer /healthz within 30 s")

    def call(self, method: str, path: str, body: object = None, token: str | None = "") -> tuple[int, Any]:
        argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, self.url + path]
        token = self.operator if token == "" else token
        if token:
            argv += ["-H", f"Authorization: Bearer {token}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        out = self.lan.run(*argv, check=False).stdout
        raw, _, code = out.rpartition("\n")
        status = int(code) if code.isdigit() else 0
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.encode()

    def sledge(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(VENV_BIN / "sledge"), *args, "--controller", self.url, "--data", str(self.data)]
        return self.lan.run(*cmd, check=check)

    def dnsmasq_pid(self, start: int = 1, timeout: float = 30) -> int:
        """The pid of the controller's `start`-th dnsmasq, from its log."""
        deadline = time.monotonic() + timeout
        needle = f"start {start})"
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if "dnsmasq started (pid " in line and needle in line:
                    return int(line.split("(pid ")[1].split(",")[0])
            time.sleep(0.1)
        raise TimeoutError(f"no dnsmasq start {start} in {self.log}")


class NetVm(Vm):
    """A QEMU machine on a tap of the lan, booting from the network: BIOS (SeaBIOS) or UEFI (OVMF).

    UEFI: the NIC's option ROM is off (romfile=), so OVMF's own PXE does DHCP and TFTPs iPXE,
    the path real UEFI servers take. BIOS: QEMU's only NIC ROMs are iPXE builds, so the
    firmware is iPXE already and goes straight to the boot script (no TFTP), as with iPXE-flashed
    NICs. Each machine gets a fresh copy of the OVMF variables.
    """

    def __init__(
        self,
        workdir: Path,
        lan: Lan,
        mac: str,
        firmware: str = "uefi",
        echo: Callable[[str], None] | None = None,
        disk_size: int = 4 << 30,
        vcpus: int = 1,
    ) -> None:
        if not 1 <= vcpus <= 64:
            raise ValueError(f"vcpus {vcpus}: expected 1 to 64")
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, 0, mac, disk_size=disk_size, echo=echo)
        self.tap = lan.tap()
        nic = f"virtio-net-pci,netdev=n0,mac={mac},bootindex=1"
        board: list[str] = []
        if firmware == "uefi":
            nic += ",romfile="
            # IPv6 PXE off, as an operator sets it in a server's firmware setup: after iPXE
            # exits the firmware would otherwise try it (~1 min) before the disk (docs/boot.md)
            board = ovmf_board(workdir, {"IPv6PXESupport": "n"})
        elif firmware != "bios":
            raise ValueError(f"firmware {firmware!r}: expected bios or uefi")
        self.argv = [
            "ip", "netns", "exec", lan.ns,
            # more than one vCPU: one host thread each (MTTCG), as a server's cores run at once
            "qemu-system-x86_64", "-accel", "tcg" if vcpus == 1 else "tcg,thread=multi",
            "-cpu", "qemu64,+rdrand", "-m", "1024", "-smp", str(vcpus),
            *board,
            "-nographic", "-serial", "stdio", "-monitor", f"unix:{self.monitor},server,nowait",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", nic,
            "-drive", f"file={self.disk},if=none,id=d0,format=raw,cache=unsafe,discard=unmap",
            "-device", "virtio-blk-pci,drive=d0,bootindex=2",
        ]  # fmt: skip
