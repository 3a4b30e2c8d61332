"""A provisioning L2 of a test's own: a network namespace with a bridge, and clients on it.

Nothing leaves the namespace. Processes started inside are ended by their PIDs, then the
namespaces are deleted, even when the test failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field


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
