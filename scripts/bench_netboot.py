"""Power-on to agent registered through DHCP + TFTP + iPXE, BIOS and UEFI, on a bridge in a netns.

    .venv/bin/python scripts/bench_netboot.py [--runs 3] [--firmware uefi bios] [--vcpus 2 1]
                                              [--compare DIR]

Root. The same measurement as `scripts/bench --only boot` (section C, benchlib/bootbench.py), alone:
per firmware, the median of the runs and where the time went, from the moment each console line
appeared (benchlib/netboot.py has the phases), and the bytes sent over TFTP and over HTTP.

--compare DIR: another live image (DIR/vmlinuz, DIR/initramfs.zst, e.g. a build of an older
commit) against this one, booted alternately (A B, B A, ...) on one controller, so that both see
the same load on a shared machine; prints each phase's median for both.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.bootbench import DHCP, FIRMWARES, VCPUS, one_boot, run_boot_bench
from benchlib.netboot import Boot, median_phases
from benchlib.report import targets_table
from lab import build_live_image
from netlab import Lan, NetController


def compare(work: Path, other: Path, runs: int, firmwares: list[str], vcpus: int) -> None:
    kernel, initrd = build_live_image()
    images = {"compared": (other / "vmlinuz", other / "initramfs.zst"), "this": (kernel, initrd)}
    boots: dict[tuple[str, str], list[Boot]] = {}
    lan = Lan().up()
    try:
        controller = NetController(work / "data", lan, DHCP)
        controller.start()
        boot_dir = controller.data / "boot"
        boot_dir.mkdir(parents=True, exist_ok=True)
        for rep in range(runs):
            for firmware in firmwares:
                order = list(images) if rep % 2 == 0 else list(reversed(images))
                for name in order:
                    shutil.copyfile(images[name][0], boot_dir / "vmlinuz")
                    shutil.copyfile(images[name][1], boot_dir / "initrd.img")
                    series = list(images).index(name)
                    boots.setdefault((firmware, name), []).append(
                        one_boot(lan, work, firmware, rep, runs, series, vcpus)
                    )
    finally:
        lan.down()
    for firmware in firmwares:
        a, b = boots[(firmware, "compared")], boots[(firmware, "this")]
        print(f"\n{firmware}, {vcpus} vCPU(s): medians of {runs}, {other} against this build\n")
        print(f"| phase | {other.name} | this |\n| --- | ---: | ---: |")
        for (name, x), (_, y) in zip(median_phases(a), median_phases(b), strict=True):
            print(f"| {name} | {x:.1f} s | {y:.1f} s |")
        ta, tb = statistics.median(x.total for x in a), statistics.median(x.total for x in b)
        print(f"| **power-on to registered** | **{ta:.1f} s** | **{tb:.1f} s** |")
        runs_a, runs_b = " ".join(f"{x.total:.1f}" for x in a), " ".join(f"{x.total:.1f}" for x in b)
        print(f"| runs | {runs_a} | {runs_b} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--firmware", nargs="+", choices=FIRMWARES, default=list(FIRMWARES))
    parser.add_argument(
        "--vcpus", type=int, nargs="+", default=list(VCPUS), help="the machines' vCPUs (--compare: the first)"
    )
    parser.add_argument(
        "--compare", type=Path, help="a directory with another build's vmlinuz, initramfs.zst"
    )
    args = parser.parse_args()
    if args.compare and not all((args.compare / f).is_file() for f in ("vmlinuz", "initramfs.zst")):
        parser.error(f"--compare {args.compare}: expected vmlinuz and initramfs.zst in it")
    work = Path(tempfile.mkdtemp(prefix="sledge-netboot-"))
    try:
        if args.compare:
            compare(work, args.compare, args.runs, args.firmware, args.vcpus[0])
            return 0
        lines, targets = run_boot_bench(work, args.runs, tuple(args.firmware), tuple(args.vcpus))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines) + "\n\n" + targets_table(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
