"""The live image's udhcpc event script (initramfs/udhcpc.script) on a real interface: a veth in a
network namespace of the test's own, with /run and /etc on tmpfs in a mount namespace so the
script's resolv.conf and markers stay there. `ip monitor` records every address and route change
the kernel saw: a renewal of the same lease must change nothing (the agent's connections and
routes survive), a new address must replace the old one."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "initramfs" / "udhcpc.script"

pytestmark = [pytest.mark.root]

LEASE = {"ip": "10.79.0.5", "mask": "24", "router": "10.79.0.1", "dns": "10.79.0.1", "lease": "120",
         "serverid": "10.79.0.1"}  # fmt: skip


@pytest.fixture
def ns() -> Iterator[str]:
    need("ip", "unshare", "busybox")
    name = f"sl-dh-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True
        )
        for dev in ("lo", "eth0", "peer0"):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Box:
    """One mount namespace (private /run and /etc) inside the network namespace, kept by a shell
    that runs the event script on request, as udhcpc would (event as $1, the lease in env)."""

    def __init__(self, ns: str, work: Path) -> None:
        self.ns = ns
        self.work = work
        self.out = work / "out"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
             # /etc/alternatives stays: awk is a link through it
             "mount -t tmpfs run /run && mkdir /run/host-etc && mount --bind /etc /run/host-etc"
             " && mount -t tmpfs etc /etc && mkdir /etc/alternatives"
             " && mount --bind /run/host-etc/alternatives /etc/alternatives && exec sh -s"],
            stdin=subprocess.PIPE, text=True,
        )  # fmt: skip

    def event(self, name: str, **env: str) -> str:
        done = self.work / f"done-{uuid.uuid4().hex[:6]}"
        assigns = " ".join(f"{k}='{v}'" for k, v in {"interface": "eth0", **env}.items())
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"env {assigns} sh {SCRIPT} {name} >>{self.out} 2>&1; echo $? >{done}\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 20
        while not done.exists() or not done.read_text().strip():
            assert time.monotonic() < deadline, f"udhcpc.script {name} did not finish"
            time.sleep(0.02)
        assert done.read_text().strip() == "0"
        return self.out.read_text()

    def sh(self, command: str) -> str:
        result = self.work / f"sh-{uuid.uuid4().hex[:6]}"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{{ {command}; }} >{result}.tmp 2>&1; mv {result}.tmp {result}\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 20
        while not result.exists():
            assert time.monotonic() < deadline, f"{command!r} did not finish"
            time.sleep(0.02)
        return result.read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def box(ns: str, tmp_path: Path) -> Iterator[Box]:
    b = Box(ns, tmp_path)
    try:
        yield b
    finally:
        b.close()


class Monitor:
    """`ip -o monitor address route` in the namespace: every change the kernel announces."""

    def __init__(self, ns: str, log: Path) -> None:
        self.log = log
        self.file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ip", "-n", ns, "-o", "monitor", "address", "route"], stdout=self.file, stderr=subprocess.STDOUT
        )
        time.sleep(0.3)  # subscribed before the change under test

    def stop(self) -> list[str]:
        time.sleep(0.3)  # the kernel's messages for the last change are read
        self.proc.terminate()
        self.proc.wait(10)
        self.file.close()
        return [line for line in self.log.read_text().splitlines() if line.strip()]


def addresses(ns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0", "scope", "global"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.split()[3] for line in out.splitlines()]


def default_route(ns: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, "-4", "route", "show", "default"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_bound_configures_address_route_dns_and_marks_the_lease(ns: str, box: Box) -> None:
    log = box.event("deconfig")
    log = box.event("bound", **LEASE)
    assert addresses(ns) == ["10.79.0.5/24"]
    assert default_route(ns).startswith("default via 10.79.0.1 dev eth0")
    assert box.sh("cat /etc/resolv.conf").strip() == "nameserver 10.79.0.1"
    assert box.sh("ls /run/sledge/leases").split() == ["eth0"]
    assert "sledge-dhcp: eth0: bound: address none -> 10.79.0.5/24" in log
    assert "lease 120 s from 10.79.0.1" in log


def test_renewing_the_same_lease_changes_no_address_and_no_route(ns: str, box: Box, tmp_path: Path) -> None:
    box.event("bound", **LEASE)
    monitor = Monitor(ns, tmp_path / "monitor.log")
    log = box.event("renew", **LEASE)
    changes = monitor.stop()
    assert [c for c in changes if c.startswith("Deleted")] == [], changes
    assert addresses(ns) == ["10.79.0.5/24"]
    assert default_route(ns).startswith("default via 10.79.0.1 dev eth0")
    assert "sledge-dhcp: eth0: renew: kept 10.79.0.5/24" in log
    # and a dotted mask, as other udhcpc builds pass it, is the same lease
    monitor = Monitor(ns, tmp_path / "monitor2.log")
    box.event("renew", **{**LEASE, "mask": "255.255.255.0"})
    assert [c for c in monitor.stop() if c.startswith("Deleted")] == []


def test_a_new_address_replaces_the_old_one(ns: str, box: Box, tmp_path: Path) -> None:
    box.event("bound", **LEASE)
    monitor = Monitor(ns, tmp_path / "monitor.log")
    log = box.event("bound", **{**LEASE, "ip": "10.79.0.9"})
    changes = monitor.stop()
    assert addresses(ns) == ["10.79.0.9/24"]
    assert default_route(ns).startswith("default via 10.79.0.1 dev eth0")
    assert "bound: address 10.79.0.5/24 -> 10.79.0.9/24" in log
    assert any(c.startswith("Deleted") and "10.79.0.5/24" in c for c in changes), changes
    # the new address came before the old one went: the NIC was never without one
    added = next(i for i, c in enumerate(changes) if "10.79.0.9/24" in c and not c.startswith("Deleted"))
    removed = next(i for i, c in enumerate(changes) if c.startswith("Deleted") and "10.79.0.5/24" in c)
    assert added < removed, changes


def test_a_lost_lease_removes_the_address_and_a_failed_round_is_marked(ns: str, box: Box) -> None:
    box.event("bound", **LEASE)
    log = box.event("deconfig")
    assert addresses(ns) == []
    assert "deconfig: lease lost, removing 10.79.0.5/24" in log
    assert box.sh("ls /run/sledge/leases").split() == []
    log = box.event("leasefail")
    assert "leasefail: no lease yet" in log
    assert box.sh("ls /run/sledge/dhcp/failed").split() == ["eth0"]
