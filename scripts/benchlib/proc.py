"""Running commands: explicit argument lists, wall-clock timing, peak RSS, and cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

# Every child started through this module, so that an interrupted run can end them.
_live: set[subprocess.Popen[bytes]] = set()


class BenchError(Exception):
    """A set-up step failed: the benchmark cannot go on."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: Sequence[str]) -> str:
    """Run an untimed helper command; return its stdout; raise BenchError when it fails."""
    p = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {p.returncode}: {tail(p.stderr or p.stdout)}")
    return p.stdout


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


@dataclass
class Timed:
    """One timed command (or pipeline): wall seconds from start to the last exit."""

    argv: list[str]
    seconds: float
    returncodes: list[int]
    stdout: str
    stderr: str
    maxrss: int  # bytes, largest over the processes
    cpu: float = 0.0  # user + system seconds of every process (and the children each waited for)

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def error(self) -> str:
        return f"exit {self.returncodes}: {tail(self.stderr)}"


def start(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    p: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
    _live.add(p)
    return p


def reap(p: subprocess.Popen[bytes]) -> tuple[int, int, float]:
    """Wait for one child with wait4: (exit code, peak RSS in bytes, user + system CPU seconds).
    Linux's wait4 counts the child's own time and that of the children it waited for."""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    _live.discard(p)
    return p.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def timed(argv: Sequence[str], *, discard_stdout: bool = False) -> Timed:
    return timed_pipeline([argv], discard_stdout=discard_stdout)


def timed_pipeline(stages: Sequence[Sequence[str]], *, discard_stdout: bool = False) -> Timed:
    """Run `a | b | ...`, each stage's stderr and the last stdout kept in unnamed temporary files."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sink: int | IO[bytes] = subprocess.DEVNULL if discard_stdout else out
        procs: list[subprocess.Popen[bytes]] = []
        t0 = time.monotonic()
        try:
            upstream: int | IO[bytes] = subprocess.DEVNULL
            for i, argv in enumerate(stages):
                last = i == len(stages) - 1
                p = start(argv, stdin=upstream, stdout=sink if last else subprocess.PIPE, stderr=err)
                if procs and procs[-1].stdout is not None:
                    procs[-1].stdout.close()  # the next stage holds the pipe now
                procs.append(p)
                if not last:
                    assert p.stdout is not None
                    upstream = p.stdout
            results = [reap(p) for p in procs]
        except BaseException:
            for p in procs:
                stop(p)
            raise
        seconds = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        return Timed(
            argv=[" | ".join(" ".join(a) for a in stages)],
            seconds=seconds,
            returncodes=[rc for rc, _, _ in results],
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            maxrss=max(rss for _, rss, _ in results),
            cpu=sum(cpu for _, _, cpu in results),
        )


def kill_all() -> None:
    """End every child still running (by its own pid) and reap it."""
    for p in list(_live):
        stop(p)


def stop(p: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """End one child started with start(): SIGTERM, SIGKILL after `grace` seconds; reap it."""
    if p not in _live:
        return
    _live.discard(p)
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
    p.wait()
