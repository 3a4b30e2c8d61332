"""Section O (issue 13): the Debian 12 OS image of scripts/build-os-image, in figures.

- its data size, stored size (zstd level 3) and chunk count;
- its deploy onto a blank loop device from nginx on 127.0.0.1, against the line rate and `zstd -d`
  of the same chunks, and against `bmaptool copy` (zstd image + bmap) and `curl | zstd -d | dd
  oflag=direct`: section F's runners (speedbench.py), given this image;
- bytes a real `sledge serve` sends (its sledge_served_bytes_total) for a rebuild of v1 over v1,
  the upgrade v1 -> v2 and the rollback v2 -> v1, in place on the loop device, against the stored
  bytes of the chunks that differ. v2 is v1 with 16 MiB of new files in its root filesystem
  (debugfs), what a package update looks like to the disk;
- power-on to SSH login under TCG, BIOS and UEFI, one QEMU at a time: `scripts/demo --os`, the
  real path (PXE, DHCP and TFTP from `sledge serve --dhcp full` in a network namespace, deploy,
  reboot into Debian, cloud-init, SSH to the leased address).
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchlib.proc import BenchError, kill_all, log, run, timed
from benchlib.report import Row, Target, heading, median
from benchlib.services import LoopDevice, Nginx
from benchlib.sledge import REPO, chunk_table, import_image, tool, write_argv, write_report
from benchlib.speedbench import SpeedBench, make_compressible
from benchlib.system import MiB, human

LEVEL = 3
BOOT_TARGET = 240.0  # seconds, power-on to SSH login (issue 13 item 6)
V2_FILES = 16 * MiB
LOGIN = re.compile(r"power-on to SSH login: (\d+) s")
DONE = re.compile(r"done in (\d+) s")


def os_image(given: Path | None) -> Path:
    if given is not None:
        return given
    log("O: scripts/build-os-image (cached when its inputs have not changed)")
    run([str(REPO / "scripts" / "build-os-image")])
    return REPO / "build" / "os-image" / "debian-12.qcow2"


def make_v2(v1_raw: Path, v2_raw: Path, work: Path) -> None:
    """v1 with V2_FILES of new files in the root filesystem (the last partition, from sgdisk)."""
    info = run(["sgdisk", "-i", "3", str(v1_raw)])
    first = int(re.search(r"First sector: (\d+)", info).group(1))  # type: ignore[union-attr]
    last = int(re.search(r"Last sector: (\d+)", info).group(1))  # type: ignore[union-attr]
    root = work / "root-v2.ext4"
    run(["cp", "--sparse=always", str(v1_raw), str(v2_raw)])
    extent = [f"skip={first * 512}", f"count={(last - first + 1) * 512}", "iflag=skip_bytes,count_bytes"]
    run(["dd", f"if={v1_raw}", f"of={root}", "bs=1M", *extent, "conv=sparse", "status=none"])
    payload = work / "v2-files.bin"
    make_compressible(payload, V2_FILES)
    run(["debugfs", "-w", "-R", f"write {payload} /usr/share/sledge-v2.bin", str(root)])
    run(["e2fsck", "-fn", str(root)])
    back = [f"seek={first * 512}", "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"]
    run(["dd", f"if={root}", f"of={v2_raw}", "bs=1M", *back])


def served(base: str) -> int:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("sledge_served_bytes_total "):
                return int(line.split()[1])
    raise BenchError(f"{base}/metrics: no sledge_served_bytes_total")


def differing_stored(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> int:
    """Stored bytes of new's data chunks at offsets where old has other bytes: what must move."""
    return sum(
        n["stored_len"]
        for n, o in zip(new, old, strict=True)
        if n["kind"] == "data" and n["digest"] != o["digest"]
    )


class Serve:
    """`sledge serve` on 127.0.0.1 with the images in its store (chunks and manifests at /store/)."""

    def __init__(self, data: Path, port: int = 8479) -> None:
        self.data, self.port = data, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Serve:
        argv = [tool("sledge"), "serve", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data)]
        with open(self.data / "serve.log", "ab") as log_file:  # the child keeps its own copy
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                served(self.base)
                return self
            except (OSError, BenchError):
                if self.proc.poll() is not None:
                    tail = (self.data / "serve.log").read_text()[-500:]
                    raise BenchError(f"sledge serve exited: {tail}") from None
                time.sleep(0.2)
        raise BenchError("sledge serve did not answer /metrics within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def redeploys(work: Path, qcow2: Path, device_size: int) -> list[Row]:
    data = work / "serve"
    store = data / "store"
    store.mkdir(parents=True)
    # the image at its own size (section F pads it to whole 4 MiB chunks for fio and the peers,
    # which would put its backup GPT short of its end: not an image an operator imports)
    v1_raw, v2_raw = work / "v1.img", work / "v2.img"
    run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(v1_raw)])
    make_v2(v1_raw, v2_raw, work)
    v1 = import_image(v1_raw, "debian", "1", store).digest
    v2 = import_image(v2_raw, "debian", "2", store).digest
    t1, t2 = chunk_table(store, "debian:1"), chunk_table(store, "debian:2")
    manifest = max((store / "manifests" / d).stat().st_size for d in (v1, v2))
    rows = [heading(f"O. redeploys in place, bytes sledge serve sent (manifest <= {manifest} B)")]
    with Serve(data) as serve, LoopDevice(work / "redeploy.bin", device_size) as loop:
        steps = [
            ("first deploy of v1 (blank disk)", v1, sum(c["stored_len"] for c in t1 if c["kind"] == "data")),
            ("rebuild: v1 again over v1", v1, 0),
            ("upgrade v1 -> v2", v2, differing_stored(t1, t2)),
            ("rollback v2 -> v1", v1, differing_stored(t2, t1)),
        ]
        for label, digest, expected in steps:
            before = served(serve.base)
            store_url = f"{serve.base}/v1/store"
            argv = write_argv(f"{store_url}/manifests/{digest}", f"{store_url}/", loop.device, inplace=True)
            t = timed(argv)
            row = Row(f"  {label}")
            if not t.ok:
                row.failures.append(t.error())
            else:
                moved = served(serve.base) - before
                report = write_report(t)
                row.ratio_value = moved / expected if expected else None
                row.notes = [
                    f"served {moved:,} B; changed chunks' stored bytes {expected:,} B; "
                    f"{report['chunks_fetched']} of {report['chunks_total']} chunks fetched, "
                    f"{report['chunks_inplace']} in place, {report['chunks_restored']} rebuilt from the disk"
                ]
            rows.append(row)
    return rows


def boots(reps: int) -> tuple[list[Row], list[Target]]:
    rows: list[Row] = [
        heading("O. power-on to SSH login under TCG (`scripts/demo --os`, one QEMU at a time)")
    ]
    targets: list[Target] = []
    for firmware in ("bios", "uefi"):
        seconds: list[float] = []
        whole: list[float] = []  # the demo from its start (images cached) to its end
        failures: list[str] = []
        for rep in range(1, reps + 1):
            log(f"O: scripts/demo --os ({firmware}), {rep}/{reps}")
            argv = [str(REPO / "scripts" / "demo"), "--os", "--timeout", "600"]
            t = timed([*argv, "--bios"] if firmware == "bios" else argv)
            found = LOGIN.search(t.stdout)
            if t.ok and found:
                seconds.append(float(found.group(1)))
                done = DONE.search(t.stdout)
                whole.append(float(done.group(1)) if done else float("nan"))
            else:
                failures.append(f"rep {rep}: {t.error() if not t.ok else 'no login time in its output'}")
        row = Row(f"  {firmware.upper()}: power-on to SSH login")
        row.failures = failures
        if seconds:
            runs = " ".join(f"{s:.0f}" for s in seconds)
            demo = " ".join(f"{s:.0f}" for s in whole)
            row.notes = [f"median {median(seconds):.0f} s (runs {runs}); the whole demo {demo} s"]
        rows.append(row)
        got = median(seconds)
        targets.append(
            Target(
                f"OS image, {firmware.upper()}: power-on to SSH login (TCG)",
                f"<= {BOOT_TARGET:.0f} s",
                f"{got:.0f} s",
                bool(seconds) and not failures and got <= BOOT_TARGET,
            )
        )
    kill_all()
    return rows, targets


def run_os_bench(work: Path, reps: int, image: Path | None, boot: bool) -> tuple[list[Row], list[Target]]:
    qcow2 = os_image(image)
    bench = SpeedBench(work / "speed", 0, reps, qcow2, [LEVEL])
    bench.prepare()
    st = bench.stores[LEVEL]
    table = chunk_table(st.store, f"bench-os:{LEVEL}")
    kinds = {k: sum(1 for c in table if c["kind"] == k) for k in ("data", "zero")}
    loop_size = -(-(bench.size + bench.size // 4) // MiB) * MiB
    with Nginx(bench.www, work / "nginx") as web, LoopDevice(work / "loop.bin", loop_size) as loop:
        bench.run_all(web, loop.device)
    bench.table_rows()  # annotates the rows (ratios to zstd -d, chunk counts)
    picked = [bench.rows.get(k) for k in ("fio", "curl", f"zstd-{LEVEL}", f"sledge-{LEVEL}", "bmaptool")]
    picked.append(bench.rows.get("curl-zstd-dd"))
    size = Row(
        f"O. the OS image ({qcow2.name}): disk {human(bench.size)}, data {human(st.data)} "
        f"({st.data:,} B), stored {human(st.stored)} ({st.stored:,} B) at zstd {LEVEL}; "
        f"{kinds['data']} data + {kinds['zero']} zero chunks"
    )
    size.heading = True
    rows = [size, bench.line, *(r for r in picked if r is not None)]
    targets = [t for t in bench.targets() if t.label.startswith("compressible")]
    rows += redeploys(work / "redeploy", qcow2, loop_size)
    if boot:
        boot_rows, boot_targets = boots(reps)
        rows += boot_rows
        targets += boot_targets
    return rows, targets
