"""The status line drawn on every console the kernel writes to (docs/agent.md, "At the rack").

The kernel's /dev/console is only the last `console=` of the command line; the others are named
in /sys/class/tty/console/active. A virtual terminal (tty0: VGA or a framebuffer) gets the
status in its top rows, held there by a scroll region while the log and a shell scroll below;
any other console (serial, a BMC's serial-over-LAN) is a log, so it gets a `sledge-status:`
line. One thread per console, each at its own pace: a change is drawn at most once per
`min_interval` seconds, and the same status again every `repeat` seconds (a VT's top rows are
wiped by `clear`; someone attaching to a serial console late sees the state without waiting
for the next change).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.runtime.status import Status, StatusBoard, fields, status_line, status_rows


class Kind(enum.StrEnum):
    VT = "vt"  # a virtual terminal: fixed rows at the top
    LINE = "line"  # anything else: a line per status


@dataclass(frozen=True)
class Target:
    path: str
    kind: Kind


@dataclass
class Pace:
    """When a console is written: pure, the clock is the caller's."""

    min_interval: float
    repeat: float
    last_at: float | None = None
    last_key: object = None

    def delay(self, now: float, key: object, urgent: bool = False) -> float:
        """Seconds until the status `key` should be written (0: now); an urgent change (the
        machine is about to reboot or power off) does not wait out the interval."""
        if self.last_at is None or (urgent and key != self.last_key):
            return 0.0
        since = now - self.last_at
        wait = self.min_interval if key != self.last_key else self.repeat
        return max(0.0, wait - since)

    def wrote(self, now: float, key: object) -> None:
        self.last_at, self.last_key = now, key


PACES = {Kind.VT: (1.0, 5.0), Kind.LINE: (5.0, 300.0)}  # (min_interval, repeat) seconds


# -- pure ------------------------------------------------------------------------------------------


def targets(active: str, dev: str = "/dev") -> list[Target]:
    """The consoles in /sys/class/tty/console/active's text ("tty0 ttyS0"): ttyN is a VT."""
    out = []
    for name in dict.fromkeys(active.split()):  # the kernel lists each once; keep the order
        if "/" in name or name.startswith("."):
            continue
        is_vt = name.startswith("tty") and name[3:].isdigit()
        out.append(Target(f"{dev}/{name}", Kind.VT if is_vt else Kind.LINE))
    return out


def vt_frame(rows: Sequence[str], width: int, height: int) -> bytes:
    """Escape sequences (Linux console / VT100) that draw `rows` at the top in reverse video and
    keep everything else scrolling below them, leaving the cursor where it was."""
    out = ["\x1b7"]  # save the cursor and its attributes
    region = height >= len(rows) + 2
    if region:
        # origin mode off (so rows 1..n are the screen's), then the scroll region below the status
        out.append(f"\x1b[?6l\x1b[{len(rows) + 1};{height}r")
    for i, row in enumerate(rows, 1):
        out.append(f"\x1b[{i};1H\x1b[0;7m{row[:width].ljust(width)}")
    out.append("\x1b[0m")
    if region:
        # Origin mode on: a `clear` or any absolute cursor move lands inside the region, and
        # the restored cursor is kept inside it too, so nothing but this writes the status rows.
        out.append("\x1b[?6h")
    out.append("\x1b8")
    return "".join(out).encode("ascii", "replace")


def line_frame(status: Status) -> bytes:
    return (status_line(status) + "\n").encode("ascii", "replace")


# -- the edge -------------------------------------------------------------------------------------


def active_targets(sysfs: str = "/sys", dev: str = "/dev") -> list[Target]:
    try:
        active = Path(sysfs, "class/tty/console/active").read_text()
    except OSError:
        return []
    return [t for t in targets(active, dev) if os.path.exists(t.path)]


def _winsize(fd: int) -> tuple[int, int]:
    """(rows, columns) of a terminal; 25x80 when it will not say."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 25, 80
    return (rows or 25), (cols or 80)


def write_status(target: Target, status: Status) -> None:
    """One draw. Non-blocking: a console that does not drain (a serial line under flow control)
    loses this status, never holds the agent up; raises OSError."""
    fd = os.open(target.path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        if target.kind is Kind.VT:
            height, width = _winsize(fd)
            data = vt_frame(status_rows(status, width), width, height)
        else:
            data = line_frame(status)
        os.write(fd, data)
    finally:
        os.close(fd)


class ConsoleWriter:
    """A thread drawing the board's status on one console at its pace."""

    def __init__(
        self,
        target: Target,
        board: StatusBoard,
        stop: threading.Event,
        log: Callable[[str], None],
        pace: Pace | None = None,
        clock: Callable[[], float] | None = None,
        write: Callable[[Target, Status], None] = write_status,
    ) -> None:
        self.target = target
        self.board = board
        self.stop = stop
        self.log = log
        self.pace = pace or Pace(*PACES[target.kind])
        self.clock = clock or time.monotonic  # pacing must not follow the wall clock's jumps
        self.write = write
        self.writes = 0
        self.failures = 0
        self.thread = threading.Thread(target=self.run, name=f"console {target.path}", daemon=True)

    def start(self) -> ConsoleWriter:
        self.board.attach(self.target.path)
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.stop.is_set():
            status, version = self.board.snapshot()
            key = fields(status)
            urgent = status.job is not None and bool(status.job.then)
            delay = self.pace.delay(self.clock(), key, urgent)
            if delay <= 0:
                self._draw(status)
                self.pace.wrote(self.clock(), key)
                self.board.drawn(self.target.path, version)  # tried: a dead console holds nobody up
            else:
                # until it is due, or the next change (it may be urgent); 1 s: see `stop` soon.
                # Changes come at the rate of the job's events, so this wakes no more than they.
                self.board.wait_change(version, min(delay, 1.0))

    def _draw(self, status: Status) -> None:
        try:
            self.write(self.target, status)
            self.writes += 1
        except OSError as exc:
            self.failures += 1
            if self.failures == 1 and exc.errno != errno.EAGAIN:  # say it once, not every second
                self.log(f"sledge-agent: status on {self.target.path}: {exc}")


def start_writers(
    board: StatusBoard,
    stop: threading.Event,
    log: Callable[[str], None],
    found: Sequence[Target] | None = None,
) -> list[ConsoleWriter]:
    consoles = active_targets() if found is None else list(found)
    return [ConsoleWriter(t, board, stop, log).start() for t in consoles]
