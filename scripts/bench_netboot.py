"""Power-on to agent registered through DHCP + TFTP + iPXE, BIOS and UEFI, on a bridge in a netns.

    .venv/bin/python scripts/bench_netboot.py [--runs 3] [--firmware uefi bios]

Root. Prints, per firmware, the median of the runs and where the time went, from the moment
each console line appeared: firmware (power-on to its PXE), PXE (firmware DHCP + TFTP of iPXE),
iPXE DHCP, HTTP (script, kernel, initramfs), kernel (to the live image's first line), agent
(start to registered); and the bytes sent over TFTP and over HTTP.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import build_live_image
from netlab import Lan, NetController, NetVm

MARKS = (  # (phase ends at the first console line matching, phase name)
    (r">>Start PXE|iPXE initialising|iPXE \d", "firmware"),
    (r"iPXE initialising|Configuring \(net0", "PXE: DHCP + TFTP"),
    (r"Configuring \(net0 .*ok", "iPXE DHCP"),
    (r"initrd\.img\.\.\..*ok", "HTTP: script, kernel, initramfs"),
    (r"sledge-init:", "kernel"),
    (r"sledge-agent: registered as machine", "live image + agent"),
)


def one_boot(lan: Lan, c: NetController, work: Path, firmware: str, n: int) -> tuple[float, dict[str, float]]:
    stamps: list[tuple[float, str]] = []
    vm = NetVm(
        work / f"{firmware}{n}", lan, f"52:54:00:be:{n:02x}:{1 if firmware == 'uefi' else 2:02x}", firmware
    )
    vm.echo = lambda line: stamps.append((time.monotonic(), line))
    t0 = time.monotonic()
    vm.start()
    try:
        vm.wait_for(MARKS[-1][0], 600)
    finally:
        vm.stop()
    total = time.monotonic() - t0
    phases: dict[str, float] = {}
    last = t0
    for pattern, name in MARKS:
        at = next((t for t, line in stamps if t >= last and re.search(pattern, line)), last)
        phases[name] = at - last
        last = at
    return total, phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--firmware", nargs="+", default=["uefi", "bios"])
    args = parser.parse_args()
    kernel, initrd = build_live_image()
    work = Path(tempfile.mkdtemp(prefix="sledge-netboot-"))
    lan = Lan().up()
    try:
        dhcp = ["--dhcp", "full", "--interface", "br0", "--dhcp-range", "10.77.0.100,10.77.0.200"]
        c = NetController(work / "data", lan, dhcp)
        c.install_boot_files(kernel, initrd)
        c.start()
        for firmware in args.firmware:
            runs = [one_boot(lan, c, work, firmware, n) for n in range(args.runs)]
            totals = [t for t, _ in runs]
            print(
                f"{firmware}: power-on to registered, median of {len(runs)}:"
                f" {statistics.median(totals):.1f} s"
                f" (runs {', '.join(f'{t:.1f}' for t in totals)})"
            )
            for name in runs[0][1]:
                print(f"  {name:34s} {statistics.median(p[name] for _, p in runs):5.1f} s")
        log = c.log.read_text()
        tftp = sum(
            (c.data / "dnsmasq" / "tftp" / m[1]).stat().st_size
            for m in re.finditer(r"sent \S+/tftp/(\S+) to", log)
        )
        boot_files = kernel.stat().st_size + initrd.stat().st_size
        print(f"bytes over TFTP: {tftp} in all; over HTTP per boot: {boot_files} (kernel + initramfs)")
    finally:
        lan.down()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
