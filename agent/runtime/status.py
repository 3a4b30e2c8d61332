"""The agent's status as the operator at the rack sees it: machine, controller, job, last error.

Pure: the loop reports what happens to a StatusBoard (a locked Status plus a change counter),
and `fields` / `status_line` / `status_rows` turn a Status into text. The consoles it is drawn
on (agent.runtime.console) read the board at their own pace, so a job's per-chunk progress
costs a lock and a dataclass copy, never a console write.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import protocol as p
from agent.progress import human_bytes

# A serial status line's parts, each cut to its own budget so that a long job message (an erase
# listing every disk it saw) never pushes the last error off the line.
LIMITS = (120, 160, 200)
MAX_LINE = len("sledge-status: ") + sum(LIMITS) + 2 * len(" | ")
_ELLIPSIS = "..."  # ASCII: the VGA console's code page has no U+2026


@dataclass(frozen=True)
class JobStatus:
    kind: str  # deploy, erase, ...
    job_id: str
    stage: str = ""  # the job's last stage message
    done: int | None = None  # bytes, from the last progress event
    total: int | None = None
    outcome: str = ""  # "" while it runs, then succeeded / failed
    then: str = ""  # the power action under way after it (reboot, poweroff)


@dataclass(frozen=True)
class Status:
    controller: str
    mac: str = ""  # the MAC the machine booted from, until it has a machine id
    machine_id: str = ""
    job: JobStatus | None = None  # the running job, or the last one
    error: str = ""
    error_at: float | None = None  # unix time of the error


# -- transitions (pure) ------------------------------------------------------------------------------


def registered(status: Status, machine_id: str) -> Status:
    return dataclasses.replace(status, machine_id=machine_id)


def failed(status: Status, message: str, now: float) -> Status:
    return dataclasses.replace(status, error=message, error_at=now)


def job_started(status: Status, kind: str, job_id: str) -> Status:
    return dataclasses.replace(status, job=JobStatus(kind, job_id))


def job_event(
    status: Status, kind: p.EventKind, message: str, done: int | None, total: int | None, now: float
) -> Status:
    job = status.job
    if job is None:
        return status
    if kind is p.EventKind.PROGRESS and done is not None and total is not None:
        return dataclasses.replace(status, job=dataclasses.replace(job, done=done, total=total))
    if kind is p.EventKind.STAGE:
        return dataclasses.replace(status, job=dataclasses.replace(job, stage=message))
    if kind is p.EventKind.ERROR:
        return failed(status, f"{job.kind} {job.job_id}: {message}", now)
    return status  # log lines and warnings stay in the log


def powering(status: Status, action: str) -> Status:
    job = status.job
    if job is None:
        return status
    return dataclasses.replace(status, job=dataclasses.replace(job, then=action))


def job_finished(status: Status, outcome: str, message: str, now: float) -> Status:
    job = status.job
    if job is None:
        return status
    done = dataclasses.replace(status, job=dataclasses.replace(job, outcome=outcome, stage=message))
    if outcome == p.Outcome.FAILED.value:
        return failed(done, f"{job.kind} {job.job_id} failed: {message}", now)
    return done


# -- text (pure) -------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Messages come from errors, servers and disks: one line (runs of blanks and line breaks
    become a space), and no control character (an ESC would drive the operator's terminal)."""
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in " ".join(text.split()))


def clip(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= len(_ELLIPSIS):
        return text[:width]
    return text[: width - len(_ELLIPSIS)] + _ELLIPSIS


def _job_text(job: JobStatus | None) -> str:
    if job is None:
        return "job: none yet, waiting for one"
    state = job.outcome or "running"
    text = f"job {job.kind} {job.job_id} {state}"
    if job.total:
        done = job.done or 0
        text += f" {min(100 * done // job.total, 100)}% {human_bytes(done)}/{human_bytes(job.total)}"
    if job.then:
        text += f", {job.then} now"  # ahead of the stage: the last words before the screen goes
    if job.stage:
        text += f": {job.stage}"
    return text


def _error_text(status: Status) -> str:
    if not status.error:
        return "last error: none"
    at = time.strftime("%H:%M:%S UTC", time.gmtime(status.error_at)) if status.error_at is not None else "?"
    return f"last error {at}: {status.error}"


def fields(status: Status) -> tuple[str, str, str]:
    """(who and where, the job, the last error), each printable."""
    who = f"machine {status.machine_id}" if status.machine_id else "machine not registered yet"
    if status.mac and not status.machine_id:
        who += f" (MAC {status.mac})"
    head = f"{who} | controller {status.controller or '(none)'}"
    return printable(head), printable(_job_text(status.job)), printable(_error_text(status))


def status_line(status: Status) -> str:
    """One line for a serial console (a log: it scrolls, so everything is on the line)."""
    parts = (clip(text, limit) for text, limit in zip(fields(status), LIMITS, strict=True))
    return "sledge-status: " + " | ".join(parts)


def status_rows(status: Status, width: int) -> tuple[str, str, str]:
    """Three rows of `width` characters for the top of a VGA console."""
    head, job, error = fields(status)
    return (clip("sledge " + head, width), clip(job, width), clip(error, width))


# -- the board -------------------------------------------------------------------------------------


class StatusBoard:
    """The current Status behind a lock; `version` counts changes so that readers can wait on them."""

    def __init__(self, controller: str, mac: str = "", clock: Callable[[], float] = time.time) -> None:
        self._status = Status(controller, mac)
        self._version = 0
        self._cond = threading.Condition()
        self._drawn: dict[str, int] = {}  # console -> the version it last showed
        self.clock = clock

    def snapshot(self) -> tuple[Status, int]:
        with self._cond:
            return self._status, self._version

    def wait_change(self, version: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a version newer than `version`; True if there is one."""
        with self._cond:
            return self._cond.wait_for(lambda: self._version != version, timeout)

    def attach(self, console: str) -> None:
        """A console that will show the status (wait_drawn waits for it)."""
        with self._cond:
            self._drawn.setdefault(console, -1)

    def drawn(self, console: str, version: int) -> None:
        with self._cond:
            self._drawn[console] = max(version, self._drawn.get(console, -1))
            self._cond.notify_all()

    def wait_drawn(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every attached console to show the current status (before
        the machine reboots or powers off: the operator sees how the job ended)."""
        with self._cond:
            return self._cond.wait_for(lambda: all(v >= self._version for v in self._drawn.values()), timeout)

    def _apply(self, change: Callable[[Status], Status]) -> None:
        with self._cond:
            new = change(self._status)
            if new != self._status:
                self._status = new
                self._version += 1
                self._cond.notify_all()

    def registered(self, machine_id: str) -> None:
        self._apply(lambda s: registered(s, machine_id))

    def error(self, message: str) -> None:
        now = self.clock()
        self._apply(lambda s: failed(s, message, now))

    def job_started(self, kind: str, job_id: str) -> None:
        self._apply(lambda s: job_started(s, kind, job_id))

    def job_event(self, kind: p.EventKind, message: str, done: int | None, total: int | None) -> None:
        now = self.clock()
        self._apply(lambda s: job_event(s, kind, message, done, total, now))

    def powering(self, action: str) -> None:
        self._apply(lambda s: powering(s, action))

    def job_finished(self, outcome: str, message: str) -> None:
        now = self.clock()
        self._apply(lambda s: job_finished(s, outcome, message, now))
