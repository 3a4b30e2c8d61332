"""scripts/bench: build the test images, run every measurement, print one table (run as root).

Section A (issue 3): `sledge image import` of a half-sparse image against cat, bmaptool create and
casync make. Section B (issue 4): `sledge-agent write` to a loop device from nginx on 127.0.0.1
against curl | dd, bmaptool copy and casync extract, as ratios to the line rate. Section C (issue 7):
the live image. Section D (issue 5): `sledge serve` under N simulated agents on 127.0.0.1.
Section E (issue 20): `sledge-agent write` from each common static web server (scripts/webservers.py),
as ratios to nginx. Section F (issue 13): a compressible image at the limit
(benchlib/speedbench.py). Section O (issue 13): the Debian 12 OS image: sizes, deploy against
peers, redeploy bytes, power-on to SSH login (benchlib/osbench.py). Section G (issue 15): a
simulated fleet of N agents sharing chunks (benchlib/fleetbench.py), and its real case: agents in
network namespaces with tc caps writing to loop devices (benchlib/fleetreal.py).
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
from benchlib.fleetbench import run_fleet_bench
from benchlib.fleetreal import run_real_bench
from benchlib.importbench import run_import_bench
from benchlib.loadbench import LoadConfig, run_load_bench
from benchlib.osbench import run_os_bench
from benchlib.proc import BenchError, kill_all, log, run
from benchlib.report import Row, Target, table, targets_table
from benchlib.serverbench import run_server_bench
from benchlib.speedbench import run_speed_bench
from benchlib.system import GiB, MiB, fs_type, parse_size, require_root
from benchlib.writebench import run_write_bench

DISK_TMP = [Path("/tmp"), Path("/var/tmp")]
RAM_FS = {"tmpfs", "ramfs"}
TOOLS = [
    "nginx",
    "fio",
    "bmaptool",
    "casync",
    "curl",
    "dd",
    "cmp",
    "blkdiscard",
    "losetup",
    "du",
    "zstd",
    "qemu-img",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    p.add_argument("--quick", action="store_true", help="small images (256 MiB), for development")
    p.add_argument(
        "--only",
        choices=["import", "write", "boot", "load", "servers", "speed", "fleet", "os"],
        help="run one section",
    )
    p.add_argument(
        "--compressible-image",
        type=Path,
        help="section F's image (raw or qcow2; default: one built from this machine's /usr files)",
    )
    p.add_argument(
        "--os-image",
        type=Path,
        help="section O's OS image (default: scripts/build-os-image's, built or taken from its cache)",
    )
    p.add_argument(
        "--no-os-boot",
        action="store_true",
        help="section O without its power-on-to-SSH boots (QEMU under TCG, minutes each)",
    )
    p.add_argument(
        "--speed-size", type=parse_size, help="section F's built image size (default 2G; quick 256M)"
    )
    p.add_argument(
        "--levels",
        default="1,3,9",
        help="section F: zstd levels the image is imported at, comma-separated (default 1,3,9)",
    )
    p.add_argument("--import-size", type=parse_size, help="section A image size (default 4G; quick 256M)")
    p.add_argument("--write-size", type=parse_size, help="section B image size (default 2G; quick 256M)")
    p.add_argument(
        "--cold-server",
        action="store_true",
        help="do not read the served files into the page cache before each write (nginx then reads the disk)",
    )
    p.add_argument("--agents", type=int, default=2000, help="section D: simulated agents (default 2000)")
    p.add_argument(
        "--load-seconds",
        type=float,
        default=60.0,
        help="section D: seconds of steady load after enrolment (default 60)",
    )
    p.add_argument(
        "--fleet-sizes",
        default="25,50,100,200",
        help="section G: simulated fleet sizes, comma-separated (default 25,50,100,200)",
    )
    p.add_argument(
        "--fleet-chunks",
        type=int,
        default=64,
        help="section G: the image's chunks of 1 MiB (the smallest a manifest allows), default 64 (a"
        " real image has hundreds: with 16 the store-and-forward floor alone is 1.25 S/B at N = 200)",
    )
    p.add_argument(
        "--fleet-rate",
        type=float,
        default=0.5,
        help="section G: B, each agent's download and upload cap in MiB/s (default 0.5: a chunk time of"
        " 2 s; the origin's cap is 4 B); S/B = chunks x 2 s at the default",
    )
    p.add_argument(
        "--fleet-real",
        type=int,
        default=10,
        help="section G: agents of the real case (network namespaces, tc caps, loop devices); 0: skip",
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        help="where the work directory goes (default /tmp, or /var/tmp if /tmp is tmpfs)",
    )
    args = p.parse_args(argv)
    args.import_size = args.import_size or (256 * MiB if args.quick else 4 * GiB)
    args.write_size = args.write_size or (256 * MiB if args.quick else 2 * GiB)
    args.speed_size = args.speed_size or (256 * MiB if args.quick else 2 * GiB)
    try:
        args.levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        p.error(f"--levels {args.levels!r}: expected numbers like 1,3,9")
    if not args.levels or not all(1 <= x <= 19 for x in args.levels):
        p.error("--levels: zstd levels are 1 to 19")
    args.tmpdir = args.tmpdir or next((d for d in DISK_TMP if fs_type(d) not in RAM_FS), DISK_TMP[0])
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if not 1 <= args.agents <= 1 << 24:
        p.error("--agents must be between 1 and 16777216")
    if args.load_seconds < 10:
        p.error("--load-seconds must be at least 10")
    if args.write_size % (4 * MiB) or args.import_size % (4 * MiB) or args.speed_size % (4 * MiB):
        p.error("sizes must be multiples of 4 MiB")
    return args


def _interrupted(signum: int, frame: FrameType | None) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # let the clean-up finish undisturbed
    raise KeyboardInterrupt


def check_machine(work_parent: Path, only: str | None) -> None:
    if only == "load":
        return  # loopback HTTP only: no root, tools or loop devices needed
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
    lines = [
        f"sledge benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}, {cpus} cores, kernel {kernel}",
        f"command: {command}",
    ]
    if args.only != "load":  # section D is one run, and moves no image bytes
        lines += [
            f"repetitions: {args.reps}; MB/s = image bytes (10^6) per wall-clock second of the command;",
            f"caches dropped before every timed command; server side: {mode};",
            "every write is checked against the image (caches dropped) before it counts: `cmp -n SIZE`, or",
            "for sledge on a GPT image the same with its backup GPT move allowed for (benchlib/written.py).",
        ]
    lines.append(
        f"load average (1/5/15 min) at start {_load(load_before)}, at end {_load(os.getloadavg())}"
        " (the cores are shared: other work on the machine shows up as noise)."
    )
    return "\n".join(lines)


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
        check_machine(args.tmpdir, args.only)
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
        if args.only in (None, "servers"):
            server_rows, server_targets = run_server_bench(
                work / "servers", args.write_size, args.reps, not args.cold_server
            )
            rows += server_rows
            targets += server_targets
        if args.only in (None, "speed"):
            speed_rows, speed_targets = run_speed_bench(
                work / "speed", args.speed_size, args.reps, args.compressible_image, args.levels
            )
            rows += speed_rows
            targets += speed_targets
        if args.only in (None, "os"):
            os_rows, os_targets = run_os_bench(work / "os", args.reps, args.os_image, not args.no_os_boot)
            rows += os_rows
            targets += os_targets
        boot_lines: list[str] = []
        if args.only in (None, "boot"):
            boot_lines, boot_targets = run_boot_bench(work / "boot", args.reps)
            targets += boot_targets
        load_lines: list[str] = []
        if args.only in (None, "load"):
            load_cfg = LoadConfig(agents=args.agents, seconds=args.load_seconds)
            load_lines, load_targets = run_load_bench(work / "load", load_cfg)
            targets += load_targets
        fleet_lines: list[str] = []
        if args.only in (None, "fleet"):
            sizes = [int(x) for x in args.fleet_sizes.split(",") if x.strip()]
            # 64 MiB at 0.5 MiB/s per agent (S/B = 128 s), the origin at 4 B: the bytes a second of
            # the 16-chunk runs before (N = 100 agents move 50 MiB/s through the bench's processes),
            # with a real image's piece count (docs/peers.md, "Scale, and the floor")
            size = args.fleet_chunks * MiB
            rate = args.fleet_rate * MiB
            egress = 4 * rate
            fleet_lines = run_fleet_bench(
                work / "fleet", sizes, args.reps, size, rate, egress, baseline_n=10, log=log
            )
            if args.fleet_real > 0:  # the same S, B and origin cap, beside the simulated case at that N
                fleet_lines += run_real_bench(
                    work / "fleetreal", args.fleet_real, args.reps, size, rate, egress, log=log
                )
        print(header(args, argv, load_before) + "\n")
        if rows:
            print(table(rows))
        if boot_lines:
            print("\n**C. the live image and its network boot (issues 7, 12)**\n\n" + "\n".join(boot_lines))
        if load_lines:
            print("\n**D. controller load (issue 5)**\n\n" + "\n".join(load_lines))
        if fleet_lines:
            print(
                "\n**F. a simulated fleet: peers, tracker, origin (issue 15)**\n\n" + "\n".join(fleet_lines)
            )
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
