"""The live image: build it (through scripts/build-initramfs's cache), check what it holds, boot it
in QEMU (TCG) straight from -kernel/-initrd against a local HTTP server, and watch the serial
console: DHCP, the agent started by /init, its first HTTP request, the debug shell, poweroff."""

from __future__ import annotations

import http.server
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tools import need, unavailable

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "initramfs"
CONTROLLER = "http://10.0.2.100:8080"  # guestfwd'ed to the local server, never leaves the host

pytestmark = [pytest.mark.root]


@dataclass(frozen=True)
class LiveImage:
    kernel: Path
    initramfs: Path
    contents: str
    coverage: str


@pytest.fixture(scope="module")
def live_image() -> LiveImage:
    need("mmdebstrap", "cpio", "zstd", "depmod")
    subprocess.run([str(REPO / "scripts" / "build-initramfs"), "--out", str(BUILD)], check=True, timeout=1200)
    return LiveImage(
        BUILD / "vmlinuz",
        BUILD / "initramfs.zst",
        (BUILD / "contents.txt").read_text(),
        (BUILD / "coverage.txt").read_text(),
    )


# --- a recording HTTP server on loopback --------------------------------------------------------


@dataclass
class Recorder:
    started: float = field(default_factory=time.monotonic)
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def http_server() -> Iterator[tuple[int, Recorder]]:
    recorder = Recorder()

    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_one(self) -> None:
            recorder.requests.append((time.monotonic(), self.command, self.path))
            recorder.arrived.set()
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = handle_one

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], recorder
    finally:
        server.shutdown()
        server.server_close()


# --- QEMU with its serial console on a pipe ---------------------------------------------------


class Machine:
    """A QEMU process whose serial console is read line by line, timestamped from its start."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._log = log.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            t = time.monotonic() - self.started
            with self._cond:
                self.lines.append((t, line))
                self._log.write(f"{t:7.2f} {line}\n")
                self._log.flush()
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, re.Match[str]]:
        """(seconds since QEMU started, match) of the first console line matching pattern."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for t, line in self.lines[seen:]:
                    if m := regex.search(line):
                        return t, m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(line for _, line in self.lines[-25:])
                    raise AssertionError(
                        f"console never matched {pattern!r} in {timeout} s; last lines:\n{tail}"
                    )
                self._cond.wait(min(left, 0.5))

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        self._log.close()


def qemu_argv(image: LiveImage, disk: Path, port: int, append: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot",
        "-cpu", "qemu64,+rdrand",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 panic=-1 {append}",
        "-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8080-cmd:socat - TCP:127.0.0.1:{port}",
        "-device", "virtio-net-pci,netdev=n0",
        "-drive", f"file={disk},if=virtio,format=raw",
    ]  # fmt: skip


@pytest.fixture
def boot(live_image: LiveImage, tmp_path: Path) -> Iterator[Callable[[int, str], Machine]]:
    """boot(port, append) -> Machine; every machine is killed at the end, whatever happened."""
    need("qemu-system-x86_64", "socat")
    machines: list[Machine] = []

    def start(port: int, append: str) -> Machine:
        disk = tmp_path / f"disk{len(machines)}.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        log = tmp_path / f"console{len(machines)}.log"
        machine = Machine(qemu_argv(live_image, disk, port, append), log)
        machines.append(machine)
        return machine

    try:
        yield start
    finally:
        for machine in machines:
            machine.kill()


# --- the tests ------------------------------------------------------------------------------


def file_sizes(contents: str) -> dict[str, int]:
    files = contents.split("\n## files\n", 1)[1]
    return {path: int(size) for size, path in (line.split(None, 1) for line in files.splitlines() if line)}


def test_image_holds_the_agent_and_not_the_controller(live_image: LiveImage) -> None:
    files = file_sizes(live_image.contents)
    compressed = live_image.initramfs.stat().st_size
    raw = int(re.search(r"^raw size: (\d+)", live_image.contents, re.M).group(1))  # type: ignore[union-attr]
    print(f"\nlive image: {raw / 1e6:.0f} MB raw, {compressed / 1e6:.1f} MB zstd, {len(files)} files")
    assert compressed <= 60_000_000, f"initramfs.zst is {compressed} bytes, budget 60 MB"
    site = "usr/local/lib/python3.11/dist-packages"
    assert f"{site}/agent/cli.py" in files
    assert f"{site}/agent/__pycache__/cli.cpython-311.pyc" in files
    assert not [p for p in files if p.startswith(f"{site}/controller/")], "the controller must not ship"
    for path in ("init", "usr/local/bin/sledge-agent", "usr/share/udhcpc/default.script", "usr/bin/busybox"):
        assert path in files
    modules = {Path(p).name.split(".ko")[0] for p in files if p.endswith((".ko", ".ko.zst"))}
    # A sample of each class of initramfs/modules.txt (issue 17's list of what real racks need).
    for name in (
        "virtio_net", "virtio_blk", "vmxnet3", "e1000", "e1000e", "8139cp", "ice", "mlx5_core", "bnxt_en",
        "tg3", "bnx2x", "qede", "ib_ipoib", "mlx5_ib",  # NICs and InfiniBand
        "ahci", "sd_mod", "nvme", "megaraid_sas", "mpt3sas", "smartpqi", "hpsa", "aacraid", "sym53c8xx",
        "vmd",  # storage
        "xhci-pci", "ehci-pci", "usb-storage", "uas", "usbhid", "hid-generic", "md-mod", "raid1", "dm-mod",
        "ipmi_si", "ipmi_devintf",  # the BMC's system interface, for the address the inventory suggests
    ):  # fmt: skip
        assert name in modules, f"module {name} not in the image"
    for name in ("lpfc", "qla2xxx", "scsi_debug", "iwlwifi"):  # left out on purpose
        assert name not in modules, f"module {name} is in the image"
    firmware = {p.removeprefix("usr/lib/firmware/") for p in files if p.startswith("usr/lib/firmware/")}
    for name in ("intel/ice/ddp/ice.pkg", "bnx2x/bnx2x-e2-7.13.15.0.fw", "tigon/tg3_tso5.bin"):
        assert name in firmware, f"firmware {name} not in the image"
    assert not [f for f in firmware if f.startswith(("iwlwifi", "amdgpu", "netronome/"))], "unasked firmware"
    coverage = live_image.coverage
    pairs = int(re.search(r"(\d+) PCI vendor:device pairs bound by ID", coverage).group(1))  # type: ignore[union-attr]
    print(f"coverage: {re.search(r'^summary: (.*)', coverage, re.M).group(1)}")  # type: ignore[union-attr]
    assert pairs >= 2000, f"{pairs} PCI IDs bound, expected every NIC and storage driver's"
    assert re.search(r"^8086:10d3 e1000e$", coverage, re.M), "e1000e's 8086:10d3 (QEMU's e1000e) not bound"
    assert re.search(r"^ice \(.*\): all, 1/1$", coverage, re.M), "ice's DDP package not reported present"
    assert not [p for p in files if p.startswith(("usr/share/doc/", "usr/share/man/", "usr/share/locale/"))]
    assert "usr/bin/perl" not in files
    assert "usr/bin/ipmitool" in files and "usr/share/misc/enterprise-numbers.txt" not in files
    assert "etc/modprobe.d/ipmi.conf" in files  # ipmi_devintf (/dev/ipmi0) after udev's ipmi_si


def test_same_inputs_give_the_same_bytes(live_image: LiveImage, tmp_path: Path) -> None:
    out = tmp_path / "again"
    subprocess.run(
        [str(REPO / "scripts" / "build-initramfs"), "--out", str(out), "--force"], check=True, timeout=1200
    )
    if (out / "inputs.sha256").read_text() != (BUILD / "inputs.sha256").read_text():
        unavailable("the sources changed between the two builds (someone is editing agent/)")
    assert (out / "initramfs.zst").read_bytes() == live_image.initramfs.read_bytes()
    assert (out / "vmlinuz").read_bytes() == live_image.kernel.read_bytes()


@pytest.mark.qemu
def test_boots_gets_dhcp_and_runs_the_agent(
    boot: Callable[[int, str], Machine], http_server: tuple[int, Recorder]
) -> None:
    port, recorder = http_server
    machine = boot(port, f"sledge.controller={CONTROLLER} sledge.token=smoke-token")
    t_init, _ = machine.wait_for(r"sledge-init: \[[\d.]+\] sledge live image", 120)
    t_udev, _ = machine.wait_for(r"sledge-init: .* udev: devices settled", 60)
    t_dhcp, m = machine.wait_for(r"sledge-dhcp: (\S+): bound: address \S+ -> (\d+\.\d+\.\d+\.\d+)/", 60)
    assert m.group(2).startswith("10.0.2."), m.group(0)
    t_start, _ = machine.wait_for(r"sledge-init: .* starting sledge-agent run \(attempt 1\)", 30)
    machine.wait_for(r"sledge-agent: controller http://10\.0\.2\.100:8080", 60)
    assert recorder.arrived.wait(60), "the agent made no HTTP request to the controller"
    t_http = recorder.requests[0][0] - machine.started
    print(
        f"\nboot timeline (s after QEMU start): /init {t_init:.1f}, udev settled {t_udev:.1f}, "
        f"DHCP lease {t_dhcp:.1f}, agent started {t_start:.1f}, first HTTP request {t_http:.1f} "
        f"({recorder.requests[0][1]} {recorder.requests[0][2]})"
    )
    assert t_http < 90


@pytest.mark.qemu
def test_debug_shell_sees_the_settings_and_powers_off(
    boot: Callable[[int, str], Machine], http_server: tuple[int, Recorder]
) -> None:
    port, _ = http_server
    machine = boot(port, f"sledge.shell=1 sledge.dhcp=0 sledge.controller={CONTROLLER} sledge.token=t0k-3n")
    machine.wait_for(r"sledge\.shell=1: root shell on /dev/ttyS0", 120)
    for _ in range(20):  # the shell may not be reading yet: ask until it answers
        machine.type("echo SHELL-$((6 * 7))\n")
        try:
            machine.wait_for(r"^SHELL-42", 3)
            break
        except AssertionError:
            continue
    machine.type(
        '. /run/sledge/env; echo "TOKEN=$SLEDGE_TOKEN POWER=$SLEDGE_POWER"; sledge-agent --help | head -1\n'
    )
    machine.wait_for(r"^TOKEN=t0k-3n POWER=1", 10)
    machine.wait_for(r"usage: sledge-agent", 30)
    machine.type("poweroff\n")
    machine.proc.wait(timeout=60)  # QEMU ends by itself when the guest powers off
