"""The live image keeps its DHCP lease through a deploy that lasts longer than the lease.

`sledge serve --dhcp full --lease-time 120` (dnsmasq's minimum) with a one-address range on a
bridge in a network namespace of the test's own; a BIOS machine boots the agent and deploys a
200 MiB image of random bytes over a link that `tc` shapes to 1.6 MB/s once the agent has
registered (a slow provisioning network; only the controller's TCP traffic is shaped, DHCP is
not), so the deploy takes about 2 minutes. Meanwhile a second host on the LAN asks for an
address all the time and must get none: the one address stays the agent's. The lease must be
renewed (dnsmasq's lease file moves its expiry; the console logs each renewal) without the
address ever being dropped.
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

from lab import build_live_image  # noqa: E402
from netlab import OVMF_CODE, Lan, NetController, NetVm  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.qemu]
BOOT = 240.0
LEASE = 120
ADDRESS = "10.77.0.100"
MAC = "52:54:00:12:00:31"
IMAGE_MIB = 224
RATE = "12800kbit"  # 1.6 MB/s: 224 MiB take ~145 s; each of the agent's 4 fetch threads still
# gets ~400 KB/s, well above what its trickle check allows for a 1 MiB chunk (~95 KB/s)


@pytest.fixture(scope="module")
def live_image() -> tuple[Path, Path]:
    need("qemu-system-x86_64", "dnsmasq", "mmdebstrap", "curl", "ip", "tc", "busybox")
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


def random_image(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def lease_expiry(c: NetController, mac: str) -> int:
    """The expiry (unix seconds) of the MAC's lease in dnsmasq's lease file."""
    for line in (c.data / "dnsmasq" / "leases").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == mac:
            assert fields[2] == ADDRESS, line
            return int(fields[0])
    raise AssertionError(f"no lease for {mac} in {c.data / 'dnsmasq' / 'leases'} (expired, or never taken)")


def shape(lan: Lan, tap: str) -> None:
    """Slow down what the controller sends the machine over TCP; everything else (DHCP) is not."""
    lan.run("tc", "qdisc", "add", "dev", tap, "root", "handle", "1:", "htb", "default", "10")
    lan.run("tc", "class", "add", "dev", tap, "parent", "1:", "classid", "1:10", "htb", "rate", "1gbit")
    lan.run("tc", "class", "add", "dev", tap, "parent", "1:", "classid", "1:20", "htb",
            "rate", RATE, "ceil", RATE)  # fmt: skip
    lan.run("tc", "filter", "add", "dev", tap, "parent", "1:", "protocol", "ip", "u32",
            "match", "ip", "protocol", "6", "0xff", "match", "ip", "sport", "8470", "0xffff",
            "flowid", "1:20")  # fmt: skip


def test_the_agent_keeps_its_lease_through_a_deploy_longer_than_the_lease(
    lan: Lan, tmp_path: Path, live_image: tuple[Path, Path]
) -> None:
    dhcp = ["--dhcp", "full", "--interface", "br0", "--dhcp-range", f"{ADDRESS},{ADDRESS}",
            "--lease-time", str(LEASE)]  # fmt: skip
    c = NetController(tmp_path / "data", lan, dhcp)
    c.install_boot_files(*live_image)
    c.start()
    c.import_image(random_image(tmp_path / "random.img", IMAGE_MIB), "random", "v1")
    (tmp_path / "random.img").unlink()
    vm = NetVm(tmp_path / "vm", lan, MAC, "bios")
    probe_log = tmp_path / "probe.log"
    try:
        vm.start()
        vm.wait_for(r"sledge-agent: registered as machine", BOOT)
        first = lease_expiry(c, MAC)
        shape(lan, vm.tap)
        # a second host that wants an address for as long as the deploy runs
        probe = lan.client("probe")
        script = tmp_path / "probe.script"
        script.write_text(f'#!/bin/sh\necho "$1 ${{ip:-}}" >>{probe_log}\n')
        script.chmod(0o755)
        lan.spawn(["ip", "netns", "exec", probe, "busybox", "udhcpc", "-f", "-i", "eth0", "-s", str(script),
                   "-t", "3", "-T", "2", "-A", "2"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        t0 = time.monotonic()
        status, job = c.call("POST", "/v1/jobs", {"machine": MAC, "kind": "deploy", "image": "random:v1",
                                                  "params": {"power": "poweroff"}})  # fmt: skip
        assert status == 201, job
        deadline = t0 + 600
        while (state := c.job(str(job["id"]))["state"]) not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"deploy still {state} after 600 s"
            time.sleep(2)
        took = time.monotonic() - t0
        assert state == "succeeded", c.job(str(job["id"]))
        last = lease_expiry(c, MAC)
    finally:
        for proc in lan.procs[1:]:  # the probe (the controller is ended by lan.down)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        vm.stop()
    console = "\n".join(vm.lines)
    print(f"\ndeploy took {took:.0f} s; lease expiry moved {last - first} s; console renewals:")
    print("\n".join(line for line in vm.lines if "sledge-dhcp" in line))
    assert took > LEASE + 10, f"the deploy took {took:.0f} s, not longer than the {LEASE} s lease"
    # renewed: dnsmasq extended the lease, the agent's script logged renewals of the same address
    assert last - first >= LEASE // 2, f"lease expiry moved {last - first} s (first {first}, last {last})"
    renewals = re.findall(rf"sledge-dhcp: \S+: renew: kept {re.escape(ADDRESS)}/24", console)
    assert len(renewals) >= 2, console[-3000:]
    assert "lease lost" not in console and "deconfig" not in console.split("bound: address")[-1]
    # the second host asked all along and never got the address
    probe_events = probe_log.read_text() if probe_log.exists() else ""
    assert "leasefail" in probe_events, probe_events
    assert "bound" not in probe_events, probe_events
    log = c.log.read_text()
    assert "no address available" in log
    assert re.search(rf"DHCPACK\(br0\) {re.escape(ADDRESS)} (?!{MAC})", log) is None  # only the agent's
