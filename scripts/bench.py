"""scripts/bench: build the test images, run every measurement, print one table (run as root).

Section A (issue 3): `sledge image import` of a half-sparse image against cat, bmaptool create and
casync make. Section B (issue 4): `sledge-agent write` to a loop device from nginx on 127.0.0.1
against curl | dd, bmaptool copy and casync extract, as ratios to the line rate.
Everything stays on this machine and is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from benchlib.bootbench import run_boot_bench
from benchlib.importbench import run_import_bench
from benchlib.proc import BenchError, kill_all, log, run
from benchlib.report import Row, Target, table, targets_table
from benchlib.system import GiB, MiB, fs_type, parse_size, require_root
from benchlib.writebench import run_write_bench

DISK_TMP = [Path("/tmp"), Path("/var/tmp")]
RAM_FS = {"tmpfs", "ramfs"}
TOOLS = ["nginx", "fio", "bmaptool", "casync", "curl", "dd", "cmp", "blkdiscard", "losetup", "du"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    p.add_argument("--quick", action="store_true", help="small images (256 MiB), for development")
    p.add_argument("--only", choices=["import", "write", "boot"], help="run one section")
    p.add_argument("--import-size", type=parse_size, help="section A image size (default 4G; quick 256M)")
    p.add_argument("--write-size", type=parse_size, help="section B image size (default 2G; quick 256M)")
    p.add_argument(
        "--cold-server",
        action="store_true",
        help="do not read the served files into the page cache before each write (nginx then reads the disk)",
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        help="where the work directory goes (default /tmp, or /var/tmp if /tmp is tmpfs)",
    )
    args = p.parse_args(argv)
    args.import_size = args.import_size or (256 * MiB if args.quick else 4 * GiB)
    args.write_size = args.write_size or (256 * MiB if args.quick else 2 * GiB)
    args.tmpdir = args.tmpdir or next((d for d in DISK_TMP if fs_type(d) not in RAM_FS), DISK_TMP[0])
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.write_size % (4 * MiB) or args.import_size % (4 * MiB):
        p.error("sizes must be multiples of 4 MiB")
    return args


def _interrupted(signum: int, frame: FrameType | None) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # let the clean-up finish undisturbed
    raise KeyboardInterrupt


def check_machine(work_parent: Path) -> None:
    require_root()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {' '.join(missing)} (run scripts/setup as root)")
    if fs_type(work_parent) in RAM_FS:
        raise BenchError(
            f"{work_parent} is {fs_type(work_parent)}: O_DIRECT loop devices need a real filesystem"
        )


def header(args: argparse.Namespace, argv: list[str], load_before: tuple[float, ...]) -> str:
    kernel = os.uname().release
    cpus = os.cpu_count()
    command = shlex.join(["scripts/bench", *argv])
    mode = (
        "cold (nginx reads the disk)" if args.cold_server else "warm (served files read into the page cache)"
    )
    return "\n".join(
        [
            f"sledge benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}, {cpus} cores, kernel {kernel}",
            f"command: {command}",
            f"repetitions: {args.reps}; MB/s = image bytes (10^6) per wall-clock second of the command;",
            f"caches dropped before every timed command; server side: {mode};",
            "every write is checked with `cmp -n SIZE IMAGE DEVICE` (caches dropped) before it counts.",
            f"load average (1/5/15 min) at start {_load(load_before)}, at end {_load(os.getloadavg())}"
            " (the cores are shared: other work on the machine shows up as noise).",
        ]
    )


def _load(avg: tuple[float, ...]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupted)
    work: Path | None = None
    load_before = os.getloadavg()
    try:
        check_machine(args.tmpdir)
        work = Path(tempfile.mkdtemp(prefix="sledge-bench-", dir=args.tmpdir))
        (work / "tmp").mkdir()
        os.environ["TMPDIR"] = str(work / "tmp")  # the tools' temporaries (casync's .carem) go too
        log(f"work directory {work} ({run(['df', '-h', '--output=avail', str(work)]).split()[-1]} free)")
        rows: list[Row] = []
        targets: list[Target] = []
        if args.only in (None, "import"):
            rows += run_import_bench(work / "import", args.import_size, args.reps)
        if args.only in (None, "write"):
            write_rows, targets = run_write_bench(
                work / "write", args.write_size, args.reps, not args.cold_server
            )
            rows += write_rows
        boot_lines: list[str] = []
        if args.only in (None, "boot"):
            boot_lines, boot_targets = run_boot_bench(work / "boot", args.reps)
            targets += boot_targets
        print(header(args, argv, load_before) + "\n")
        if rows:
            print(table(rows))
        if boot_lines:
            print("\n**C. the live image (issue 7)**\n\n" + "\n".join(boot_lines))
        if targets:
            print("\n" + targets_table(targets))
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        kill_all()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
            log(f"removed {work}")


if __name__ == "__main__":
    sys.exit(main())
