"""Power-on to agent registered through DHCP + TFTP + iPXE, BIOS and UEFI, on a bridge in a netns.

    .venv/bin/python scripts/bench_netboot.py [--runs 3] [--firmware uefi bios]

Root. The same measurement as `scripts/bench --only boot` (section C, benchlib/bootbench.py), alone:
per firmware, the median of the runs and where the time went, from the moment each console line
appeared (benchlib/netboot.py has the phases), and the bytes sent over TFTP and over HTTP.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.bootbench import FIRMWARES, run_boot_bench
from benchlib.report import targets_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--firmware", nargs="+", choices=FIRMWARES, default=list(FIRMWARES))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sledge-netboot-"))
    try:
        lines, targets = run_boot_bench(work, args.runs, tuple(args.firmware))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines) + "\n\n" + targets_table(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
