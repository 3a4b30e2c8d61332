"""scripts/benchlib/netboot.py: a boot's console timeline cut into the phases of the bench's table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib.netboot import MARKS, SPANS, Boot, median_phases, phases, tftp_sent

UEFI = [
    (6.7, "BdsDxe: loading Boot0002"),
    (10.3, ">>Start PXE over IPv4."),
    (10.4, "  NBP file downloaded successfully."),
    (10.6, "iPXE initialising devices...ok"),
    (12.7, "Configuring (net0 52:54:00:be:00:01)... ok"),
    (12.9, "http://10.77.0.1:8470/boot/files/vmlinuz... ok"),
    (19.0, "http://10.77.0.1:8470/boot/files/initrd.img... 73%     ok"),
    (24.3, "sledge-init: [5.15] sledge live image, kernel 6.1.0-57-amd64"),
    (25.5, "sledge-init: [6.40] udev: NIC enp0s2 named, starting DHCP on it"),
    (26.1, "sledge-init: [7.00] network: enp0s2=10.77.0.161/24 "),
    (28.0, "sledge-agent: controller http://10.77.0.1:8470"),
    (28.9, "sledge-init: [9.80] udev: devices settled"),
    (29.5, "sledge-agent: registered as machine m-f589ad772838"),
]


def test_a_uefi_boot_is_cut_at_each_mark_and_adds_up() -> None:
    boot = phases(UEFI, 29.6)
    got = {name: round(s, 2) for name, s in boot.phases}
    assert list(got) == [name for name, _ in MARKS]
    # the kernel started at 24.3 - 5.15 = 19.15 s: 0.15 s after the initramfs's download
    assert list(got.values()) == [10.3, 0.3, 2.1, 6.3, 0.15, 5.15, 1.2, 0.6, 3.4]
    assert sum(s for _, s in boot.phases) == pytest.approx(29.5)


def test_bios_has_no_firmware_pxe_and_an_old_init_its_udev_settle() -> None:
    # QEMU's iPXE NIC ROM: no ">>Start PXE" (no TFTP); /init of before issue 12 settled udev first
    bios = [
        (0.2, "iPXE initialising devices...ok"),
        (2.4, "Configuring (net0 52:54:00:be:00:02)... ok"),
        (8.5, "http://10.77.0.1:8470/boot/files/initrd.img... 72%     ok"),
        (14.6, "sledge-init: [6.07] sledge live image, kernel 6.1.0-57-amd64"),
        (18.0, "sledge-init: [9.49] udev: devices settled"),
        (20.1, "sledge-init: [11.56] network: ens3=10.77.0.161/24 "),
        (22.9, "sledge-agent: controller http://10.77.0.1:8470"),
        (23.3, "sledge-agent: registered as machine m-1"),
    ]
    got = [round(s, 2) for _, s in phases(bios, 23.4).phases]
    assert got == [0.2, 0.0, 2.2, 6.1, 0.03, 6.07, 3.4, 2.1, 3.2]


def test_a_mark_that_never_shows_leaves_its_time_to_the_next_phase() -> None:
    lines = [(l_t, line) for l_t, line in UEFI if "network:" not in line]
    got = dict(phases(lines, 29.6).phases)
    assert got["live image: DHCP"] == 0.0
    assert got["agent: the rest of its start-up, devices settled, inventory, register"] == pytest.approx(4.0)


def test_medians_are_per_phase() -> None:
    boots = [Boot(t, tuple((name, t / len(MARKS)) for name, _ in MARKS)) for t in (27.0, 36.0, 30.0)]
    got = median_phases(boots)
    assert [round(s, 3) for _, s in got[: len(MARKS)]] == [round(30.0 / len(MARKS), 3)] * len(MARKS)
    assert [s for _, s in got[len(MARKS) :]] == [0.0] * len(SPANS)  # no spans measured


def test_tftp_files_are_read_from_dnsmasq_log_lines() -> None:
    log = (
        "dnsmasq-tftp[12]: sent /var/lib/sledge/dnsmasq/tftp/snponly.efi to 10.77.0.161\n"
        "dnsmasq-dhcp[12]: DHCPACK(br0) 10.77.0.161 52:54:00:be:00:01\n"
        "dnsmasq-tftp[12]: sent /var/lib/sledge/dnsmasq/tftp/undionly.kpxe to 10.77.0.162\n"
    )
    assert tftp_sent(log) == ["snponly.efi", "undionly.kpxe"]


def test_the_kernel_phase_is_split_at_the_kernels_own_clock() -> None:
    lines = [
        (3.8, "http://10.77.0.1:8470/boot/files/initrd.img... ok"),
        (14.6, "sledge-init: [6.64] sledge live image, kernel 6.1.0-57-amd64"),
        (20.8, "sledge-agent: registered as machine m-1"),
    ]
    got = dict(phases(lines, 20.8).phases)
    assert got["iPXE hands over, the bzImage decompresses itself (XZ)"] == pytest.approx(14.6 - 6.64 - 3.8)
    assert got["kernel: its start, initramfs unpacked, to /init"] == pytest.approx(6.64)


def test_an_uptime_that_does_not_fit_the_timeline_is_not_used() -> None:
    # an uptime larger than the time since the download (a console line lost or a clock gone wrong)
    lines = [
        (3.8, "http://10.77.0.1:8470/boot/files/initrd.img... ok"),
        (9.0, "sledge-init: [6.64] sledge live image, kernel 6.1.0-57-amd64"),
    ]
    got = dict(phases(lines, 9.0).phases)
    assert got["iPXE hands over, the bzImage decompresses itself (XZ)"] == 0.0
    assert got["kernel: its start, initramfs unpacked, to /init"] == pytest.approx(5.2)


def test_the_agent_starting_beside_dhcp_is_a_span_beside_the_phases() -> None:
    # /init starts the agent before the lease: its first line comes before "network:"
    lines = [
        (3.8, "http://10.77.0.1:8470/boot/files/initrd.img... ok"),
        (14.6, "sledge-init: [6.64] sledge live image, kernel 6.1.0-57-amd64"),
        (14.7, "sledge-init: [6.74] starting sledge-agent run (attempt 1)"),
        (15.9, "sledge-init: [7.90] udev: NIC ens3 named, starting DHCP on it"),
        (16.8, "sledge-init: [8.80] network: lease on ens3"),
        (17.4, "sledge-agent: controller http://10.77.0.1:8470"),
        (18.2, "sledge-agent: registered as machine m-1"),
    ]
    boot = phases(lines, 18.2)
    got = dict(boot.phases)
    assert got["live image: udev until the NICs are named"] == pytest.approx(1.3)
    assert got["live image: DHCP"] == pytest.approx(0.9)
    assert got["agent: the rest of its start-up, devices settled, inventory, register"] == pytest.approx(1.4)
    assert sum(got.values()) == pytest.approx(18.2)
    assert dict(boot.spans) == {"agent: Python start-up (beside udev and DHCP)": pytest.approx(2.7)}
