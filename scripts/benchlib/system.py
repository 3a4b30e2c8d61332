"""Machine-level helpers: page cache, devices, sizes, ports."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchlib.proc import BenchError, run

MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000  # rates are in MB/s (10^6 bytes per second)


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("scripts/bench needs root (drop_caches, loop devices, blkdiscard)")


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(paths: Iterable[Path]) -> int:
    """Read files into the page cache (what a busy server would hold); return bytes read."""
    buf = bytearray(8 * MiB)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def warm_programs(stages: Iterable[Sequence[str]]) -> None:
    """Run each stage's program once, untimed, so its code is in the page cache (what the live
    image has: the agent runs from RAM). `--version` for the peers; for sledge's commands, the
    command's `--help`, which imports that command's modules."""
    for argv in stages:
        name = Path(argv[0]).name
        ours = name in ("sledge", "sledge-agent") and len(argv) > 1
        probe = [argv[0], argv[1], "--help"] if ours else [argv[0], "--version"]
        subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, check=False)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def discard(device: str) -> None:
    """Make the loop device read as zeros (punches holes in its backing file): a fresh disk."""
    run(["blkdiscard", device])


def same_prefix(image: Path, device: str, size: int) -> tuple[bool, str]:
    """`cmp -n SIZE IMAGE DEVICE` after flushing the caches, so the device is read from the medium."""
    drop_caches()
    out = run_unchecked(["cmp", "-n", str(size), str(image), device])
    return (out[0] == 0, out[1].strip())


def run_unchecked(argv: list[str]) -> tuple[int, str]:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return p.returncode, (p.stdout + p.stderr)


def data_bytes(path: Path) -> int:
    """Bytes of a file that are not holes (SEEK_DATA / SEEK_HOLE)."""
    total = 0
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            total += stop - start
            pos = stop
    return total


def disk_usage(path: Path) -> int:
    """Allocated bytes under a path, as `du -s` counts them."""
    return int(run(["du", "-s", "--block-size=1", str(path)]).split()[0])


def fs_type(path: Path) -> str:
    return run(["stat", "-f", "-c", "%T", str(path)]).strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_size(text: str) -> int:
    """'4G', '256M', '1024K' or plain bytes (binary units)."""
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
