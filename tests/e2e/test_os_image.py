"""A real operating system end to end (issue 13): scripts/build-os-image's Debian 12 cloud image,
imported, deployed by sledge to a QEMU machine (TCG) that PXE-boots the live image, then booted
from its disk under SeaBIOS and under OVMF. cloud-init reads the NoCloud seed the agent wrote and
configures the machine; the test logs in over SSH (QEMU forwards a port on 127.0.0.1) and checks
each thing it was asked to do. A second deploy with new user-data gets a new instance-id and
cloud-init runs again.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tools import need, unavailable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from lab import OVMF_CODE, Controller, Vm, build_live_image, build_os_image, free_port  # noqa: E402
from osdemo import deploy, make_key, ssh, user_data, wait_for_login  # noqa: E402

BOOT = 240.0  # a live-image boot or a deploy under TCG on a busy 2-core machine
OS_BOOT = 600.0  # power-on to cloud-init done: systemd + cloud-init's Python under TCG
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


@dataclass
class Lab:
    controller: Controller
    work: Path
    key: Path  # the operator's SSH private key; key.pub goes into user-data

    def deploy(
        self, vm: Vm, mac: str, hostname: str, marker: str, image: str = "debian:12"
    ) -> dict[str, Any]:
        job = deploy(self.controller, vm, mac, image, user_data(self.key, hostname, marker), 2 * BOOT)
        assert job["state"] == "succeeded", job
        return job


def check_configured(lab: Lab, port: int, hostname: str, marker: str, instance_id: str) -> None:
    """Everything the user-data asked for, the grown root and cloud-init's own verdict."""
    status = ssh(lab.key, port, "cloud-init status --long --wait", timeout=OS_BOOT)
    assert "status: done" in status, status
    result = json.loads(ssh(lab.key, port, "cat /run/cloud-init/result.json"))
    assert result["v1"]["errors"] == [], result
    assert ssh(lab.key, port, "hostname").strip() == hostname
    assert ssh(lab.key, port, "cat /etc/sledge-test").strip() == marker
    assert ssh(lab.key, port, "cat /var/lib/sledge-runcmd").strip() == marker
    assert ssh(lab.key, port, "cat /var/lib/cloud/data/instance-id").strip() == instance_id
    assert ssh(lab.key, port, "sudo -n id -u").strip() == "0"
    # Root (partition 3) grew up to the seed (the last partition, labelled cidata), and ext4 with it.
    layout = ssh(
        lab.key, port, "for p in vda3 vda4; do cat /sys/class/block/$p/start /sys/class/block/$p/size; done"
    )
    root_start, root_size, seed_start, _ = (int(v) * 512 for v in layout.split())
    assert ssh(lab.key, port, "sudo -n blkid -s LABEL -o value /dev/vda4").strip() == "CIDATA"
    assert 0 <= seed_start - (root_start + root_size) < 1 << 20, (root_start, root_size, seed_start)
    fs = ssh(lab.key, port, "sudo -n dumpe2fs -h /dev/vda3 2>/dev/null")
    fields = dict(line.split(":", 1) for line in fs.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == root_size // 4096 * 4096, fields


def boot_order(lab: Lab, port: int) -> tuple[int, list[str]]:
    """BootCurrent and the descriptions of BootOrder's entries, from the OS's efivarfs."""

    def var(name: str) -> bytes:
        hexed = ssh(lab.key, port, f"od -An -v -tx1 /sys/firmware/efi/efivars/{name}-{EFI_GLOBAL}")
        return bytes.fromhex("".join(hexed.split()))[4:]  # 4 bytes of attributes first

    current = struct.unpack("<H", var("BootCurrent"))[0]
    order = var("BootOrder")
    names = []
    for (n,) in struct.iter_unpack("<H", order):
        option = var(f"Boot{n:04X}")
        end = next(i for i in range(6, len(option) - 1, 2) if option[i : i + 2] == b"\0\0")
        names.append(f"{n:04X} {option[6:end].decode('utf-16-le')}")
    return current, names


def vendor_only(image: Path, out: Path) -> Path:
    """The same image with its loader moved from the removable-media path to EFI/debian/grubx64.efi
    (an installed system's layout): it boots only through a boot entry naming it."""
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True)
    esp = f"{out}@@{2 << 20}"  # p2 starts at 2 MiB (scripts/build-os-image)
    subprocess.run(["mmd", "-i", esp, "::/EFI/debian"], check=True)
    subprocess.run(["mmove", "-i", esp, "::/EFI/BOOT/BOOTX64.EFI", "::/EFI/debian/grubx64.efi"], check=True)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need("qemu-system-x86_64", "socat", "mmdebstrap", "ssh", "ssh-keygen", "mkfs.vfat", "mmove", "qemu-img")
    work = tmp_path_factory.mktemp("os-image")
    kernel, initrd = build_live_image()
    image = build_os_image()
    key = make_key(work / "id_ed25519")
    controller = Controller(work / "data", lease=60.0)
    controller.install_boot_files(kernel, initrd)
    controller.start()
    controller.import_image(image, "debian", "12")
    controller.import_image(vendor_only(image, work / "vendor.img"), "debian", "12-vendor")
    try:
        yield Lab(controller, work, key)
    finally:
        controller.stop()


@pytest.mark.root
@pytest.mark.qemu
def test_bios_deploy_boots_and_cloud_init_configures_the_machine(lab: Lab) -> None:
    mac, port = "52:54:00:13:00:01", free_port()
    (lab.work / "bios").mkdir()
    vm = Vm(lab.work / "bios", lab.controller.port, mac, firmware="bios", ssh_port=port)
    try:
        powered = time.monotonic()
        job = lab.deploy(vm, mac, "deployed-bios", "bios-1")
        # the disk's cloud-init (the image boots `quiet`: systemd's banner is not shown)
        vm.wait_for(r"Cloud-init v\. \S+ (running|finished)", OS_BOOT)
        login = wait_for_login(lab.key, port, vm, OS_BOOT)
        print(
            f"BIOS: power-on to SSH login {time.monotonic() - powered:.0f} s "
            f"({login:.0f} s after the disk booted)"
        )
        check_configured(lab, port, "deployed-bios", "bios-1", str(job["id"]))
    finally:
        vm.stop()


@pytest.mark.root
@pytest.mark.qemu
def test_uefi_deploy_keeps_the_network_first_and_a_redeploy_adds_a_boot_entry_and_reruns_cloud_init(
    lab: Lab,
) -> None:
    if not OVMF_CODE.exists():
        unavailable(f"needs {OVMF_CODE} (Debian package ovmf; scripts/setup installs it)")
    mac, port = "52:54:00:13:00:02", free_port()
    workdir = lab.work / "uefi"
    workdir.mkdir()
    vm = Vm(workdir, lab.controller.port, mac, firmware="uefi", ssh_port=port)
    try:
        powered = time.monotonic()
        first = lab.deploy(vm, mac, "deployed-uefi", "uefi-1")
        wait_for_login(lab.key, port, vm, OS_BOOT)
        print(f"UEFI: power-on to SSH login {time.monotonic() - powered:.0f} s")
        check_configured(lab, port, "deployed-uefi", "uefi-1", str(first["id"]))
        assert "no UEFI boot entry needed" in first["result"]["message"], first["result"]
        # The controller keeps control: the network is still first; the disk booted after iPXE's exit.
        current, order = boot_order(lab, port)
        print(f"UEFI boot order after the first deploy: {order}, current {current:04X}")
        network = order[0]
        assert "PXE" in network or "iPXE" in network or "Network" in network, order
        assert not network.startswith(f"{current:04X} "), (current, order)
        # A second deploy, of the image whose loader is only at EFI/debian/grubx64.efi, with new
        # user-data: the agent adds a boot entry for it right after the network; a new instance-id,
        # and cloud-init runs again.
        vm.stop()
        vm = Vm(workdir, lab.controller.port, mac, firmware="uefi", ssh_port=port)
        second = lab.deploy(vm, mac, "redeployed-uefi", "uefi-2", image="debian:12-vendor")
        assert second["id"] != first["id"]
        assert "UEFI boot entry added" in second["result"]["message"], second["result"]
        wait_for_login(lab.key, port, vm, OS_BOOT)
        check_configured(lab, port, "redeployed-uefi", "uefi-2", str(second["id"]))
        current, order = boot_order(lab, port)
        print(f"UEFI boot order after the second deploy: {order}, current {current:04X}")
        assert order[0] == network, order  # the controller still comes first
        # The disk booted through the entry the agent added (OVMF re-sorts BootOrder by QEMU's
        # bootindex at each boot, so where it sits among the firmware's own entries is OVMF's call).
        ours = [o for o in order if o.startswith(f"{current:04X} ")]
        assert ours and ours[0].endswith("debian:12-vendor (sledge)"), (current, order)
    finally:
        vm.stop()


@pytest.mark.root
def test_the_same_inputs_build_the_same_image(tmp_path: Path) -> None:
    need("mmdebstrap", "mkfs.vfat", "mcopy", "sgdisk", "qemu-img")
    cached = build_os_image()
    again = tmp_path / "again"
    script = str(REPO / "scripts" / "build-os-image")
    subprocess.run([script, "--out", str(again), "--force"], check=True, stdout=sys.stderr)
    second = (again / "contents.txt").read_text()

    def packages(contents: str) -> str:
        return contents.split("## Debian packages")[1]

    first = (cached.parent / "contents.txt").read_text()
    if packages(first) != packages(second):
        # The mirror moved on since the cached build (a point release, a security update): other
        # inputs. Build the cache again from the same mirror state as the second build.
        subprocess.run([script, "--force"], check=True, stdout=sys.stderr)
        first = (cached.parent / "contents.txt").read_text()
        assert packages(first) == packages(second), "the mirror changed during the test"
    digest = [line for line in first.splitlines() if line.startswith("sha256:")]
    assert digest == [line for line in second.splitlines() if line.startswith("sha256:")]
    assert subprocess.run(["cmp", str(cached), str(again / "debian-12.qcow2")]).returncode == 0
