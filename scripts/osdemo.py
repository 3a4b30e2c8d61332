"""A real OS deployed by sledge and logged into (issue 13): the pieces the e2e test and the demo share.

`os_demo()` is the demo's ending for scripts/demo (`--os`): the Debian 12 cloud image
(scripts/build-os-image), deployed to a QEMU machine with user-data carrying an SSH key made here,
booted from its disk, then cloud-init's result and an SSH login, printed.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from lab import Controller, Vm, build_live_image, build_os_image, free_port

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


def ssh(key: Path, port: int, command: str, timeout: float = 120, tries: int = 3) -> str:
    """Run command as `op` on the machine whose port 22 is forwarded to 127.0.0.1:port. A TCG guest
    on a loaded host can miss the banner exchange: ssh's own failures (exit 255) are tried again."""
    argv = ["ssh", "-i", str(key), "-p", str(port), *SSH_OPTIONS, "op@127.0.0.1", command]
    for attempt in range(tries):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 255 or attempt == tries - 1:
            break
        time.sleep(2)
    if out.returncode != 0:
        raise AssertionError(f"ssh {command!r}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def wait_for_login(key: Path, port: int, vm: Vm, timeout: float) -> float:
    """Seconds until an SSH login as the user cloud-init created works."""
    started = time.monotonic()
    while True:
        try:
            ssh(key, port, "true", timeout=60, tries=1)
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


def os_demo(work: Path, say: Callable[[str], None] = print, firmware: str = "bios") -> None:
    """The whole story on a fresh controller in work/: import, deploy, boot, cloud-init, SSH."""
    work.mkdir(parents=True, exist_ok=True)
    kernel, initrd = build_live_image()
    image = build_os_image()
    key = make_key(work / "id_ed25519")
    controller = Controller(work / "data")
    controller.install_boot_files(kernel, initrd)
    controller.start()
    vm: Vm | None = None
    try:
        say(f"importing {image.name}: {controller.import_image(image, 'debian', '12')}")
        mac, port = "52:54:00:13:d0:01", free_port()
        (work / "vm").mkdir(exist_ok=True)
        vm = Vm(work / "vm", controller.port, mac, firmware=firmware, ssh_port=port)
        powered = time.monotonic()
        job = deploy(controller, vm, mac, "debian:12", user_data(key, "sledge-demo", "hello"), 480)
        say(f"deploy {job['id']}: {job['state']}")
        if job["state"] != "succeeded":
            raise AssertionError(f"deploy failed: {job}")
        wait_for_login(key, port, vm, 600)
        say(f"power-on to SSH login: {time.monotonic() - powered:.0f} s")
        say(ssh(key, port, "cloud-init status --long --wait", timeout=600).strip())
        say(ssh(key, port, "hostname; id; cat /etc/sledge-test; df -h /").strip())
    finally:
        if vm is not None:
            vm.stop()
        controller.stop()
