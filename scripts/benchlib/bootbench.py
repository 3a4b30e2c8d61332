"""Section C (issue 7): the live image's size, and QEMU power-on -> PXE -> registered with the controller."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from lab import Controller, Vm, build_live_image

from benchlib.proc import log
from benchlib.report import Target

MAC = "52:54:00:be:0c:01"


def run_boot_bench(work: Path, reps: int) -> tuple[list[str], list[Target]]:
    kernel, initrd = build_live_image()
    raw = _raw_size(initrd.parent / "contents.txt")
    compressed = initrd.stat().st_size
    controller = Controller(work / "data")
    controller.install_boot_files(kernel, initrd)
    controller.start()
    times: list[float] = []
    try:
        for rep in range(reps):
            vm_dir = work / f"vm{rep}"
            vm_dir.mkdir(parents=True)
            vm = Vm(vm_dir, controller.port, MAC)
            started = time.monotonic()
            vm.start()
            try:
                vm.wait_for(r"sledge-agent: registered as machine", 300)
                times.append(time.monotonic() - started)
                log(f"boot {rep + 1}/{reps}: registered {times[-1]:.1f} s after power-on")
            finally:
                vm.stop()
    finally:
        controller.stop()
    median = statistics.median(times)
    lines = [
        "| live image | value | runs |",
        "| --- | ---: | ---: |",
        f"| kernel | {kernel.stat().st_size / 1e6:.1f} MB | |",
        f"| initramfs, zstd | {compressed / 1e6:.1f} MB | |",
        f"| initramfs, raw | {raw / 1e6:.1f} MB | |" if raw else "| initramfs, raw | ? | |",
        "| QEMU (TCG) power-on -> iPXE -> DHCP -> kernel + initramfs over HTTP -> agent registered"
        f" | {median:.1f} s | {' '.join(f'{t:.1f}' for t in times)} |",
    ]
    targets = [
        # issue 17 raised the budget from 50 MB: every NIC/storage/USB driver class and its firmware
        Target("live image, compressed", "<= 60 MB", f"{compressed / 1e6:.1f} MB", compressed <= 60e6),
        Target("power-on through PXE to registered, no KVM", "<= 25 s", f"{median:.1f} s", median <= 25),
    ]
    return lines, targets


def _raw_size(contents: Path) -> int:
    """The raw (cpio) size from the build's listing: its "raw size: N bytes" line."""
    try:
        for line in contents.read_text().splitlines():
            if line.startswith("raw size:"):
                return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return 0
