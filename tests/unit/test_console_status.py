"""The agent's status line: the pure formatter and pacing, the loop feeding the board, and the
writer on a real pseudo-terminal (a line console and a VT-like one)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import protocol as p
from agent.runtime import console
from agent.runtime.console import ConsoleWriter, Kind, Pace, Target, targets, vt_frame
from agent.runtime.fake import FakeTransport
from agent.runtime.status import (
    MAX_LINE,
    JobStatus,
    Status,
    StatusBoard,
    clip,
    fields,
    job_event,
    job_finished,
    job_started,
    printable,
    registered,
    status_line,
    status_rows,
)
from tests.unit.test_agent_loop_fake import make

MiB = 1 << 20
URL = "http://10.0.2.100:8080"


def test_a_fresh_agent_shows_its_mac_and_controller_and_no_job() -> None:
    line = status_line(Status(URL, mac="52:54:00:17:00:01"))
    assert line == (
        "sledge-status: machine not registered yet (MAC 52:54:00:17:00:01) | controller "
        "http://10.0.2.100:8080 | job: none yet, waiting for one | last error: none"
    )


def test_a_running_job_shows_kind_id_progress_and_stage() -> None:
    s = registered(Status(URL, mac="52:54:00:17:00:01"), "m-0123456789ab")
    s = job_started(s, "deploy", "j-00000000000a")
    s = job_event(s, p.EventKind.STAGE, "writing demo:1 (64.0 MiB) to /dev/vda", None, None, 1.0)
    s = job_event(s, p.EventKind.PROGRESS, "ignored: the numbers are shown", 16 * MiB, 64 * MiB, 2.0)
    head, job, error = fields(s)
    assert head == "machine m-0123456789ab | controller http://10.0.2.100:8080"
    assert (
        job
        == "job deploy j-00000000000a running 25% 16.0 MiB/64.0 MiB: writing demo:1 (64.0 MiB) to /dev/vda"
    )
    assert error == "last error: none"


def test_log_and_warning_events_do_not_change_the_status() -> None:
    s = job_started(Status(URL), "erase", "j-00000000000b")
    for kind in (p.EventKind.LOG, p.EventKind.WARNING):
        assert job_event(s, kind, "chunk 3 from mirror: timed out", None, None, 5.0) == s


def test_a_failed_job_becomes_the_last_error_with_its_time() -> None:
    s = job_started(registered(Status(URL), "m-0123456789ab"), "deploy", "j-00000000000c")
    s = job_event(s, p.EventKind.ERROR, "deploy failed: disk selection: no disk", None, None, 60.0)
    s = job_finished(s, "failed", "disk selection: no disk matches serial=NOPE", 3661.0)
    _, job, error = fields(s)
    assert job == "job deploy j-00000000000c failed: disk selection: no disk matches serial=NOPE"
    failure = "deploy j-00000000000c failed: disk selection: no disk matches serial=NOPE"
    assert error == f"last error 01:01:01 UTC: {failure}"


def test_a_succeeded_job_keeps_the_earlier_error() -> None:
    s = Status(URL, error="waiting for a job: connection refused", error_at=0.0)
    s = job_finished(job_started(s, "erase", "j-00000000000d"), "succeeded", "erased /dev/vda", 10.0)
    assert fields(s)[1] == "job erase j-00000000000d succeeded: erased /dev/vda"
    assert fields(s)[2] == "last error 00:00:00 UTC: waiting for a job: connection refused"


def test_control_characters_from_messages_never_reach_a_console() -> None:
    hostile = "bad\x1b[2J\x1b]0;owned\x07\r\nnext line\tmodel \u00e9\x00"
    s = Status(URL, error=hostile, error_at=0.0)
    for text in (status_line(s), *status_rows(s, 80)):
        assert all(0x20 <= ord(c) < 0x7F for c in text), repr(text)
    assert printable(hostile) == "bad?[2J?]0;owned? next line model ??"


def test_lines_and_rows_are_bounded_and_keep_every_part() -> None:
    s = Status(URL, error="x" * 10_000, error_at=0.0)
    assert len(status_line(s)) < MAX_LINE and status_line(s).endswith("...")
    listing = "disk selection: no disk matches; disks seen:\n" + "  /dev/sdX  model=BIG DISK\n" * 100
    s = job_finished(job_started(Status(URL * 10), "erase", "j-00000000000f"), "failed", listing, 0.0)
    line = status_line(s)
    assert len(line) == MAX_LINE, line
    head, job, error = line.split(" | job erase ")[0], *line.split(" | job erase ")[1].split(" | last error ")
    assert head.endswith("...") and job.endswith("...") and error.endswith("..."), line
    assert error.startswith(
        "00:00:00 UTC: erase j-00000000000f failed: disk selection: no disk matches; disks"
    )
    rows = status_rows(s, 80)
    assert [len(r) for r in rows] == [len(rows[0]), len(rows[1]), 80] and rows[2].endswith("...")
    assert rows[0].startswith("sledge machine not registered yet")
    assert clip("abcdef", 2) == "ab" and clip("abc", 3) == "abc"


def test_the_consoles_are_read_from_the_kernels_active_list() -> None:
    assert targets("tty0 ttyS0\n") == [Target("/dev/tty0", Kind.VT), Target("/dev/ttyS0", Kind.LINE)]
    assert targets("ttyS1 hvc0 tty7 ttyS1", dev="/d") == [
        Target("/d/ttyS1", Kind.LINE),
        Target("/d/hvc0", Kind.LINE),
        Target("/d/tty7", Kind.VT),
    ]
    assert targets("../sda .x ttyUSB0") == [Target("/dev/ttyUSB0", Kind.LINE)]
    assert targets("") == []


def test_the_pace_draws_a_change_at_most_once_per_interval_and_repeats_the_same() -> None:
    pace = Pace(min_interval=1.0, repeat=5.0)
    assert pace.delay(100.0, "a") == 0.0  # never drawn: now
    pace.wrote(100.0, "a")
    assert pace.delay(100.2, "b") == pytest.approx(0.8)  # a change, too soon
    assert pace.delay(101.5, "b") == 0.0
    assert pace.delay(102.0, "a") == pytest.approx(3.0)  # unchanged: repeated at 105
    assert pace.delay(106.0, "a") == 0.0
    assert pace.delay(101.0, "c", urgent=True) == 0.0  # about to power off: no waiting
    assert pace.delay(101.0, "a", urgent=True) == pytest.approx(4.0)  # already shown


def test_the_vt_frame_keeps_the_status_rows_out_of_the_scroll_region() -> None:
    frame = vt_frame(("one", "two", "three"), 10, 25).decode()
    assert frame.startswith("\x1b7\x1b[?6l\x1b[4;25r")  # save cursor, origin off, rows 4-25 scroll
    assert "\x1b[1;1H\x1b[0;7mone       " in frame and "\x1b[3;1H\x1b[0;7mthree     " in frame
    assert frame.endswith("\x1b[0m\x1b[?6h\x1b8")  # attributes off, origin mode on, cursor back
    tiny = vt_frame(("a", "b", "c"), 4, 4).decode()  # no room for a region: rows only
    assert "r" not in tiny.replace("\x1b[0;7m", "") and tiny.endswith("\x1b[0m\x1b8")


# -- the board fed by the agent's loop ---------------------------------------------------------------


def test_the_board_counts_changes_and_wakes_a_waiter() -> None:
    board = StatusBoard(URL, clock=lambda: 7.0)
    _, v0 = board.snapshot()
    board.registered("m-0123456789ab")
    board.registered("m-0123456789ab")  # no change: no new version
    status, v1 = board.snapshot()
    assert v1 == v0 + 1 and status.machine_id == "m-0123456789ab"
    assert not board.wait_change(v1, 0.05)
    threading.Timer(0.05, board.error, args=("boom",)).start()
    assert board.wait_change(v1, 5.0)
    assert board.snapshot()[0].error_at == 7.0


def test_the_loop_reports_registration_jobs_and_failures_to_the_board(tmp_path: Path) -> None:
    t = FakeTransport()
    ok = t.add_job(p.JobKind.INVENTORY)
    bad = t.add_job(p.JobKind.ERASE, p.JobParams(disk=p.DiskHints.from_wire({"serial": "NOPE"})))
    agent, _, _ = make(tmp_path, t)
    assert agent.run(max_jobs=1) == 1
    status, _ = agent.status.snapshot()
    assert status.machine_id == agent.machine_id != ""
    assert status.job == JobStatus(
        "inventory", ok, status.job.stage if status.job else "", None, None, "succeeded"
    )
    assert status.error == ""
    assert agent.run(max_jobs=1) == 1
    status, _ = agent.status.snapshot()
    assert status.job is not None and (status.job.kind, status.job.job_id) == ("erase", bad)
    assert status.job.outcome == "failed" and "serial s== 'nope'" in status.error
    assert status.error.startswith(f"erase {bad} failed: ")


# -- the writer on a real terminal ---------------------------------------------------------------------


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: (master fd to read what a console shows, the slave's path to write to)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


def read_for(fd: int, seconds: float) -> bytes:
    out = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            out += os.read(fd, 65536)
    return out


def test_a_line_console_gets_a_line_per_change_at_a_bounded_rate(terminal: tuple[int, str]) -> None:
    master, path = terminal
    board = StatusBoard(URL)
    stop = threading.Event()
    writer = ConsoleWriter(Target(path, Kind.LINE), board, stop, print, Pace(0.5, 60.0)).start()
    try:
        first = read_for(master, 0.3)
        board.job_started("deploy", "j-00000000000e")
        for i in range(1, 201):  # per-chunk progress: 200 changes in ~0.4 s
            board.job_event(p.EventKind.PROGRESS, "", i * MiB, 200 * MiB)
            time.sleep(0.002)
        later = read_for(master, 1.6)
    finally:
        stop.set()
        writer.thread.join(5)
    assert first == b"sledge-status: " + status_line(Status(URL)).split(": ", 1)[1].encode() + b"\r\n"
    lines = later.decode().splitlines()
    assert 1 <= len(lines) <= 4, lines  # paced, not one per chunk
    assert "job deploy j-00000000000e running 100% 200.0 MiB/200.0 MiB" in lines[-1]  # the last state lands


def test_a_vt_console_gets_the_status_rows_sized_to_the_terminal(terminal: tuple[int, str]) -> None:
    master, path = terminal
    board = StatusBoard(URL, "52:54:00:17:00:01")
    console.write_status(Target(path, Kind.VT), board.snapshot()[0])
    shown = read_for(master, 0.3).decode()
    assert shown.startswith("\x1b7\x1b[?6l\x1b[4;30r")  # the terminal's 30 rows
    row1 = "sledge machine not registered yet (MAC 52:54:00:17:00:01) | controller http://10.0.2.100:8080"
    assert f"\x1b[1;1H\x1b[0;7m{row1.ljust(100)}\x1b[2;1H" in shown  # its 100 columns


def test_a_console_that_cannot_be_written_is_reported_once(tmp_path: Path) -> None:
    said: list[str] = []
    board = StatusBoard(URL)
    stop = threading.Event()
    gone = Target(str(tmp_path / "ttyS9"), Kind.LINE)
    writer = ConsoleWriter(gone, board, stop, said.append, Pace(0.01, 0.01)).start()
    time.sleep(0.3)
    stop.set()
    writer.thread.join(5)
    assert writer.failures >= 5 and writer.writes == 0
    assert (
        len(said) == 1
        and said[0].startswith(f"sledge-agent: status on {gone.path}: ")
        and "No such file" in said[0]
    )


def test_the_consoles_show_how_a_job_ended_before_the_machine_powers_off(tmp_path: Path) -> None:
    t = FakeTransport()
    job = t.add_job(p.JobKind.REBOOT, p.JobParams(power=p.PowerAction.POWEROFF))
    agent, _, _ = make(tmp_path, t)
    shown: list[Status] = []
    at_power: list[list[Status]] = []
    real_power = agent.machine.power
    agent.machine.power = lambda action: (at_power.append(list(shown)), real_power(action))  # type: ignore[method-assign]
    stop = threading.Event()
    # a serial console's pace: a change waits 5 s after the last line, unless the machine is going
    writer = ConsoleWriter(
        Target("/dev/null", Kind.LINE), agent.status, stop, print, write=lambda _, s: shown.append(s)
    )
    writer.start()
    try:
        started = time.monotonic()
        assert agent.run(max_jobs=1) == 1
        took = time.monotonic() - started
    finally:
        stop.set()
        writer.thread.join(5)
    assert at_power and at_power[0], "nothing drawn before the power action"
    last = at_power[0][-1]
    assert last.job is not None and (last.job.job_id, last.job.outcome, last.job.then) == (
        job,
        "succeeded",
        "poweroff",
    )
    assert ", poweroff now: " in fields(last)[1]
    assert took < 4.0, f"the agent waited {took:.1f} s for the console"
