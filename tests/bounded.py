"""Run a piece of code on hostile input in a forked child and bound it: no traceback (the child
reports any exception as a failure), wall time, and memory (peak RSS over the parent's at fork)."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Cost:
    seconds: float
    peak_mib: float  # the child's peak resident memory above the parent's at fork


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def bounded(fn: Callable[[], object], seconds: float, mib: float) -> Cost:
    """Run fn in a child; fail (AssertionError) on an exception, a timeout or too much memory."""
    base = _rss_mib()
    read, write = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        os.close(read)
        code = 0
        try:
            fn()
        except BaseException:
            os.write(write, traceback.format_exc().encode()[-4000:])
            code = 1
        os._exit(code)
    os.close(write)
    deadline = start + seconds
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.wait4(pid, 0)
            os.close(read)
            raise AssertionError(f"took more than {seconds} s")
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    with os.fdopen(read, "rb") as f:
        report = f.read().decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, f"child failed:\n{report}"
    peak = usage.ru_maxrss / 1024 - base  # ru_maxrss is in KiB on Linux
    assert peak < mib, f"peak memory {peak:.0f} MiB over the parent's, expected under {mib} MiB"
    return Cost(elapsed, peak)
