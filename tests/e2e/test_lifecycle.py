"""The whole machine lifecycle with a real QEMU machine (TCG) PXE-booting the live image from a real
controller: discover -> deploy -> reboot into the image; v2 over v1 moving only changed chunks; a reset
in the middle of a deploy; erase then verify; refused enrollment tokens.

The steps share one lab (controller, machine, disk) and run in file order, as an operator would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import REGISTER_PATH
from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from lab import Controller, Vm, build_demo_image, build_live_image  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.qemu]
MAC = "52:54:00:e2:e0:01"
BOOT = 240.0  # seconds for a boot under TCG on a busy 2-core machine
MiB = 1 << 20


@dataclass
class Lab:
    controller: Controller
    vm: Vm
    work: Path

    def boot(self) -> None:
        """Power the machine on (again), with the same disk."""
        self.vm.stop()
        self.vm = Vm(self.work / "vm", self.controller.port, MAC)
        self.vm.start()

    def run_job(self, kind: str, **body: object) -> str:
        status, job = self.controller.call("POST", "/v1/jobs", {"machine": MAC, "kind": kind, **body})
        assert status == 201, job
        return str(job["id"])

    def wait_job(self, job_id: str, timeout: float = BOOT) -> dict[str, Any]:
        return self.controller.wait_job(job_id, timeout)

    def chunks(self, ref: str) -> dict[str, int]:
        out = subprocess.run(
            [
                str(REPO / ".venv/bin/sledge"),
                "image",
                "show",
                ref,
                "--json",
                "--chunks",
                "--store",
                str(self.controller.data / "store"),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return {c["digest"]: c["stored_len"] for c in json.loads(out)["chunk_table"] if c["kind"] == "data"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need("qemu-system-x86_64", "socat", "mmdebstrap", "extlinux")
    work = tmp_path_factory.mktemp("lifecycle")
    kernel, initrd = build_live_image()
    v1, v2 = build_demo_image("v1"), build_demo_image("v2")
    big = work / "big.img"  # v1 plus 160 MiB of random data after its partition: slow enough to interrupt
    shutil.copyfile(v1, big)
    with open(big, "r+b") as f:
        f.seek(64 * MiB)
        for _ in range(160):
            f.write(os.urandom(MiB))
    controller = Controller(work / "data", lease=30.0)
    controller.install_boot_files(kernel, initrd)
    controller.start()
    for image, version in ((v1, "v1"), (v2, "v2"), (big, "big")):
        controller.import_image(image, "demo", version)
    (work / "vm").mkdir()
    vm = Vm(work / "vm", controller.port, MAC)
    lab = Lab(controller, vm, work)
    try:
        yield lab
    finally:
        lab.vm.stop()
        controller.stop()
        for name in ("console.log",):
            log = work / "vm" / name
            if log.exists():
                print(f"--- {log} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-40:]))


def test_a_discover_deploy_and_reboot_into_the_image(lab: Lab) -> None:
    lab.vm.start()
    lab.vm.wait_for(r"sledge-agent: registered as machine", BOOT)
    machine = lab.controller.machine(MAC)
    assert machine is not None and machine["state"] == "ready"
    status, detail = lab.controller.call("GET", f"/v1/machines/{MAC}")
    assert status == 200 and any(d["name"] == "vda" for d in detail["inventory"]["disks"])
    job = lab.wait_job(lab.run_job("deploy", image="demo:v1"))
    assert job["state"] == "succeeded", job
    lab.vm.wait_for(r"SLEDGE-DEMO-IMAGE-BOOTED v1", BOOT)  # rebooted, iPXE said exit, its disk booted
    machine = lab.controller.machine(MAC)
    assert machine is not None and machine["state"] == "deployed"


def test_b_v2_over_v1_fetches_only_the_changed_chunks(lab: Lab) -> None:
    v1, v2 = lab.chunks("demo:v1"), lab.chunks("demo:v2")
    changed = sum(size for digest, size in v2.items() if digest not in v1)
    assert 0 < changed < sum(v2.values()) / 2
    job_id = lab.run_job("deploy", image="demo:v2")
    lab.boot()
    lab.vm.wait_for(r"sledge-agent: registered as machine", BOOT)
    served_before = lab.controller.bytes_served()  # boot files are served by now
    job = lab.wait_job(job_id)
    served = lab.controller.bytes_served() - served_before
    assert job["state"] == "succeeded", job
    manifest = (
        (
            lab.controller.data
            / "store"
            / "manifests"
            / str(json.loads(json.dumps(job))["params"]["manifest_digest"])
        )
        .stat()
        .st_size
    )
    assert served <= 1.1 * changed + manifest, (served, changed)
    lab.vm.wait_for(r"SLEDGE-DEMO-IMAGE-BOOTED v2", BOOT)


def test_c_reset_mid_deploy_then_the_deploy_completes_without_refetching(lab: Lab) -> None:
    total = sum(lab.chunks("demo:big").values())
    job_id = lab.run_job("deploy", image="demo:big")
    lab.boot()
    lab.vm.wait_for(rf"\[deploy {job_id}\] progress", BOOT)
    lab.vm.hmp("system_reset")  # the power button, mid-write
    mark = lab.vm.mark()
    lab.vm.wait_for(r"sledge-agent: registered as machine", BOOT, since=mark)
    job = lab.wait_job(job_id)
    assert job["state"] == "succeeded", job
    message = str(job["result"]["message"])
    in_place = int(message.split(" already in place")[0].split(", ")[-1])
    assert in_place > 1, message  # chunks written before the reset were found, not fetched again
    assert int(job["result"]["bytes_fetched"]) < total
    lab.vm.wait_for(r"SLEDGE-DEMO-IMAGE-BOOTED v1", BOOT, since=mark)  # big = v1 + data after it


def test_d_erase_then_verify_reports_the_disk_no_longer_matches(lab: Lab) -> None:
    erase_id = lab.run_job("erase", params={"erase_mode": "metadata"})
    verify_id = lab.run_job("verify", image="demo:v1")
    lab.boot()
    erased = lab.wait_job(erase_id)
    assert erased["state"] == "succeeded", erased
    verified = lab.wait_job(verify_id)
    assert verified["state"] == "failed"
    assert "does not match the image" in str(verified["result"]["message"])
    lab.vm.stop()


def test_e_wrong_and_reused_enrollment_tokens_are_refused_and_change_nothing(lab: Lab) -> None:
    before = lab.controller.call("GET", f"/v1/machines/{MAC}")[1]
    status, body = lab.controller.call(
        "POST",
        REGISTER_PATH,
        {"enrollment_token": "not-a-token", "inventory": before["inventory"]},
        None,
    )
    assert status == 401 and "token" in body["error"]
    _, script = lab.controller.call("GET", f"/boot/ipxe?mac={MAC}", token=None)
    token = script.decode().split("sledge.token=")[1].split()[0]
    request = {"enrollment_token": token, "inventory": before["inventory"]}
    assert lab.controller.call("POST", REGISTER_PATH, request, None)[0] == 200
    after_first = lab.controller.call("GET", f"/v1/machines/{MAC}")[1]
    status, body = lab.controller.call("POST", REGISTER_PATH, request, None)
    assert status == 401 and "used" in body["error"]
    assert lab.controller.call("GET", f"/v1/machines/{MAC}")[1] == after_first  # nothing changed
