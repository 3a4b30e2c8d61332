"""Network boot on a real L2: QEMU machines on tap devices of a bridge inside a network namespace
that the test creates, the controller and its dnsmasq listening on that bridge (no user networking,
nothing leaves the namespace). UEFI machines take the firmware's own PXE: DHCP, TFTP snponly.efi,
then iPXE fetches the boot script over HTTP; BIOS machines (QEMU's NIC ROM is iPXE) go from DHCP
straight to the script. Each case boots to "registered" and prints its power-on time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from lab import build_demo_image, build_live_image  # noqa: E402
from netlab import OVMF_CODE, Lan, NetController, NetVm  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.qemu]
BOOT = 240.0  # seconds for a boot under TCG on a busy 2-core machine
REGISTERED = r"sledge-agent: registered as machine"
FULL = ["--dhcp", "full", "--interface", "br0", "--dhcp-range", "10.77.0.100,10.77.0.200"]


@pytest.fixture(scope="module")
def live_image() -> tuple[Path, Path]:
    need("qemu-system-x86_64", "dnsmasq", "mmdebstrap", "curl", "ip")
    if not OVMF_CODE.exists():
        message = f"needs {OVMF_CODE} (Debian package ovmf; scripts/setup installs it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return build_live_image()


@pytest.fixture
def lan() -> Iterator[Lan]:
    lan = Lan().up()
    try:
        yield lan
    finally:
        lan.down()


def controller(lan: Lan, tmp: Path, live: tuple[Path, Path], dhcp: list[str]) -> NetController:
    c = NetController(tmp / "data", lan, dhcp)
    c.install_boot_files(*live)
    c.start()
    return c


def boot_to_registered(vm: NetVm, c: NetController, mac: str) -> float:
    """Power on, wait for the agent; seconds from power-on to registered."""
    t0 = time.monotonic()
    vm.start()
    vm.wait_for(REGISTERED, BOOT)
    seconds = time.monotonic() - t0
    machine = c.machine(mac)
    assert machine is not None and machine["state"] == "ready", machine
    return seconds


def served(c: NetController, name: str) -> bool:
    return any(f"sent {c.data}/dnsmasq/tftp/{name}" in line for line in c.log.read_text().splitlines())


def test_uefi_pxe_boots_through_dhcp_tftp_and_ipxe(
    lan: Lan, tmp_path: Path, live_image: tuple[Path, Path]
) -> None:
    c = controller(lan, tmp_path, live_image, FULL)
    mac = "52:54:00:12:00:01"
    vm = NetVm(tmp_path / "vm", lan, mac, "uefi")
    try:
        seconds = boot_to_registered(vm, c, mac)
    finally:
        vm.stop()
    assert served(c, "snponly.efi")  # the firmware's PXE took the TFTP path
    log = c.log.read_text()
    assert "DHCPACK(br0)" in log and mac in log
    print(f"\nUEFI power-on to registered (DHCP + TFTP + iPXE): {seconds:.1f} s")


def test_bios_pxe_boots_to_registered(lan: Lan, tmp_path: Path, live_image: tuple[Path, Path]) -> None:
    c = controller(lan, tmp_path, live_image, FULL)
    mac = "52:54:00:12:00:02"
    vm = NetVm(tmp_path / "vm", lan, mac, "bios")
    try:
        seconds = boot_to_registered(vm, c, mac)
    finally:
        vm.stop()
    assert "http://10.77.0.1:8470/boot.ipxe" in "\n".join(vm.lines)  # DHCP named the script
    print(f"\nBIOS power-on to registered (DHCP + iPXE ROM): {seconds:.1f} s")


def uefi_image(work: Path) -> Path:
    out = work / "uefi-v1.img"
    subprocess.run([str(REPO / "scripts" / "build-uefi-demo-image"), str(out)], check=True)
    return out


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_imaged_then_boots_its_disk_when_the_controller_says_exit(
    lan: Lan, tmp_path: Path, live_image: tuple[Path, Path], firmware: str
) -> None:
    """After a deploy the agent reboots; iPXE gets `exit 1` and the firmware's next entry, the disk,
    boots. Under UEFI the status matters: an entry returning EFI_SUCCESS stops at the boot menu."""
    need("grub-mkstandalone", "sgdisk", "mformat")
    if firmware == "uefi":
        image, marker = uefi_image(tmp_path), "SLEDGE-UEFI-DISK-BOOTED v1"
    else:
        image, marker = build_demo_image("v1"), "SLEDGE-DEMO-IMAGE-BOOTED v1"
    c = controller(lan, tmp_path, live_image, FULL)
    c.import_image(image, "disk", "v1")
    mac = "52:54:00:12:00:1" + ("1" if firmware == "uefi" else "2")
    vm = NetVm(tmp_path / "vm", lan, mac, firmware)
    try:
        boot_to_registered(vm, c, mac)
        status, job = c.call("POST", "/v1/jobs", {"machine": mac, "kind": "deploy", "image": "disk:v1"})
        assert status == 201, job
        deadline = time.monotonic() + BOOT
        while (state := c.job(str(job["id"]))["state"]) not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"deploy still {state}"
            time.sleep(1)
        assert state == "succeeded", c.job(str(job["id"]))
        vm.wait_for(r"is deployed, booting from disk", BOOT)
        # OVMF tries its HTTPv4 and HTTPv6 entries first (IPv6 PXE is off): dnsmasq answers
        # them with a URL that fails at once, ~15 s in all (docs/boot.md)
        vm.wait_for(marker, BOOT)
    finally:
        vm.stop()
    machine = c.machine(mac)
    assert machine is not None and machine["state"] == "deployed"


def test_dnsmasq_killed_mid_boot_is_restarted_and_the_boot_completes(
    lan: Lan, tmp_path: Path, live_image: tuple[Path, Path]
) -> None:
    c = controller(lan, tmp_path, live_image, FULL)
    mac = "52:54:00:12:00:03"
    vm = NetVm(tmp_path / "vm", lan, mac, "uefi")
    try:
        vm.start()
        # iPXE is running (TFTP done) and its own DHCP comes next: it retries for ~15 s, long
        # enough for the restart. (Killed during the firmware's own TFTP download instead,
        # OVMF's PXE fails without retrying and the machine falls through its boot order.)
        vm.wait_for(r"iPXE initialising devices", BOOT)
        os.kill(c.dnsmasq_pid(1), signal.SIGKILL)
        second = c.dnsmasq_pid(2)
        vm.wait_for(REGISTERED, BOOT)
    finally:
        vm.stop()
    log = c.log.read_text()
    assert "dnsmasq exited with -9; restarting in 1 s" in log
    assert f"dnsmasq-dhcp[{second}]: DHCPACK(br0)" in log  # iPXE's lease came from the new one


def test_proxy_mode_beside_a_plain_dhcp_server(
    lan: Lan, tmp_path: Path, live_image: tuple[Path, Path]
) -> None:
    site = lan.client("site")  # the site's own DHCP server, on another host of the LAN
    subprocess.run(["ip", "-n", site, "addr", "add", "10.77.0.2/24", "dev", "eth0"], check=True)
    site_log = tmp_path / "site-dnsmasq.log"
    with open(site_log, "wb") as out:
        lan.spawn(
            ["ip", "netns", "exec", site, "dnsmasq", "--keep-in-foreground", "--log-facility=-",
             "--conf-file=/dev/null", "--port=0", "--interface=eth0", "--bind-interfaces",
             "--dhcp-range=10.77.0.50,10.77.0.60,120", f"--pid-file={tmp_path / 'site.pid'}",
             f"--dhcp-leasefile={tmp_path / 'site.leases'}", "--log-dhcp"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    c = controller(lan, tmp_path, live_image, ["--dhcp", "proxy", "--interface", "br0"])
    macs = ["52:54:00:12:00:04", "52:54:00:12:00:05"]
    vms = [
        NetVm(tmp_path / f"vm{i}", lan, mac, fw)
        for i, (mac, fw) in enumerate(zip(macs, ["uefi", "bios"], strict=True))
    ]
    try:
        for vm in vms:
            vm.start()
        for vm in vms:
            vm.wait_for(REGISTERED, BOOT)
    finally:
        for vm in vms:
            vm.stop()
    assert served(c, "snponly.efi")
    leases = (tmp_path / "site.leases").read_text()
    for mac in macs:
        assert mac in leases  # the addresses came from the site's server
        machine = c.machine(mac)
        assert machine is not None and machine["state"] == "ready"
    assert not (c.data / "dnsmasq" / "leases").exists() or not (c.data / "dnsmasq" / "leases").read_text()
    assert "DHCPACK" not in c.log.read_text()  # sledge leased nothing


def test_three_machines_boot_at_once(lan: Lan, tmp_path: Path, live_image: tuple[Path, Path]) -> None:
    c = controller(lan, tmp_path, live_image, FULL)
    machines = [("52:54:00:12:00:21", "uefi"), ("52:54:00:12:00:22", "bios"), ("52:54:00:12:00:23", "uefi")]
    vms = [NetVm(tmp_path / f"vm{i}", lan, mac, fw) for i, (mac, fw) in enumerate(machines)]
    try:
        for vm in vms:
            vm.start()
        for vm in vms:
            vm.wait_for(REGISTERED, 2 * BOOT)  # three TCG guests share two cores
    finally:
        for vm in vms:
            vm.stop()
    acks = dict(re.findall(r"DHCPACK\(br0\) (\S+) (\S+)", c.log.read_text()))  # address -> MAC
    for mac, _ in machines:
        machine = c.machine(mac)
        assert machine is not None and machine["state"] == "ready", machine
    assert sorted(set(acks.values())) == sorted(mac for mac, _ in machines)
    assert len(acks) == 3  # one address each, none handed out twice
