"""A real OS deployed by sledge and logged into (issue 13): the pieces the e2e test and the demo share.

scripts/demo --os (scripts/demo.py) deploys the Debian 12 cloud image (scripts/build-os-image) on its
provisioning network with user-data carrying an SSH key made here, then finds the address the
machine's own DHCP client leased and logs in from inside the namespace (`ip netns exec`). The e2e
test logs in through a port QEMU forwards to 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from lab import Controller, Vm

SSH_OPTIONS = [
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
]  # fmt: skip


def make_key(path: Path) -> Path:
    """A fresh ed25519 key pair (path, path.pub), as an operator would have."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def user_data(key: Path, hostname: str, marker: str) -> str:
    """cloud-config: the hostname, a user `op` with the key and sudo, a file, a command."""
    pub = key.with_suffix(".pub").read_text().strip()
    config = {
        "hostname": hostname,
        "users": [
            {
                "name": "op",
                "ssh_authorized_keys": [pub],
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
            }
        ],
        "write_files": [{"path": "/etc/sledge-test", "content": f"{marker}\n"}],
        "runcmd": [["sh", "-c", f"echo {marker} > /var/lib/sledge-runcmd"]],
    }
    return "#cloud-config\n" + json.dumps(config)


@dataclass(frozen=True)
class Host:
    """Where the machine's port 22 answers: an address and port, reached from inside netns if set."""

    address: str = "127.0.0.1"
    port: int = 22
    netns: str | None = None

    def argv(self, key: Path, command: str) -> list[str]:
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [
            *inside,
            "ssh",
            "-i",
            str(key),
            "-p",
            str(self.port),
            *SSH_OPTIONS,
            f"op@{self.address}",
            command,
        ]


def _host(target: int | Host) -> Host:
    return target if isinstance(target, Host) else Host(port=target)


def ssh(key: Path, target: int | Host, command: str, timeout: float = 120, tries: int = 3) -> str:
    """Run command as `op` on the machine (an int: its port 22 forwarded to 127.0.0.1:target). A TCG
    guest on a loaded host can miss the banner exchange: ssh's own failures (exit 255) are tried again."""
    argv = _host(target).argv(key, command)
    for attempt in range(tries):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 255 or attempt == tries - 1:
            break
        time.sleep(2)
    if out.returncode != 0:
        raise AssertionError(f"ssh {command!r}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def wait_for_login(key: Path, target: int | Host, vm: Vm, timeout: float) -> float:
    """Seconds until an SSH login as the user cloud-init created works."""
    started = time.monotonic()
    while True:
        try:
            ssh(key, target, "true", timeout=60, tries=1)
            return time.monotonic() - started
        except (AssertionError, subprocess.TimeoutExpired):
            if time.monotonic() - started > timeout:
                tail = "\n".join(vm.lines[-30:])
                raise AssertionError(f"no SSH login within {timeout} s; console:\n{tail}") from None
            if vm.proc is None or vm.proc.poll() is not None:
                raise AssertionError("QEMU exited before an SSH login worked") from None
            time.sleep(3)


def deploy(
    controller: Controller, vm: Vm, mac: str, image: str, data: str, timeout: float
) -> dict[str, object]:
    """Deploy image with user-data and power the machine on; the finished job. A machine the
    controller does not know yet is booted first (it registers, then gets the job); a known one
    gets the job queued before power-on, or its boot script would send it to its disk."""
    body = {"machine": mac, "kind": "deploy", "image": image, "params": {"cloud_init": {"user_data": data}}}

    def queue() -> dict[str, object]:
        status, job = controller.call("POST", "/v1/jobs", body)
        if status != 201:
            raise AssertionError(f"POST /v1/jobs: HTTP {status}: {job}")
        return dict(job)

    if controller.machine(mac) is not None:
        job = queue()
        vm.start()
    else:
        vm.start()
        vm.wait_for(r"sledge-agent: registered as machine", timeout)
        job = queue()
    deadline = time.monotonic() + timeout
    while (job := controller.job(str(job["id"])))["state"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise AssertionError(f"deploy {job['id']} still {job['state']} after {timeout} s")
        time.sleep(1)
    return dict(job)


def leased_addresses(lease_file: Path, mac: str) -> list[str]:
    """IPv4 addresses dnsmasq's lease file holds for mac, latest line first. A machine holds more
    than one: the live image's DHCP client and the installed OS's present different client ids."""
    try:
        text = lease_file.read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for fields in map(str.split, text.splitlines()):
        if len(fields) >= 3 and fields[1].lower() == mac.lower():
            try:
                found.append(str(IPv4Address(fields[2])))  # only an address ever reaches ssh's argv
            except ValueError:
                continue
    return list(dict.fromkeys(reversed(found)))


def find_login(key: Path, lease_file: Path, mac: str, netns: str, vm: Vm, timeout: float) -> Host:
    """The machine's address on the provisioning network once an SSH login as `op` works there:
    each address leased to its MAC is tried (an old lease's address does not answer)."""
    deadline = time.monotonic() + timeout
    while True:
        for address in leased_addresses(lease_file, mac):
            host = Host(address, 22, netns)
            try:
                ssh(key, host, "true", timeout=60, tries=1)
                return host
            except (AssertionError, subprocess.TimeoutExpired):
                pass
        if time.monotonic() > deadline:
            tail = "\n".join(vm.lines[-30:])
            raise TimeoutError(
                f"no SSH login on {mac}'s leased addresses within {timeout} s; console:\n{tail}"
            )
        if vm.proc is None or vm.proc.poll() is not None:
            raise RuntimeError("QEMU exited before an SSH login worked")
        time.sleep(3)
