"""Run a child (dnsmasq) for as long as the controller runs: its output in our log, restarted
with a bounded backoff when it dies, stopped with us.

A controller killed with SIGKILL cannot stop its child (and PR_SET_PDEATHSIG does not survive
dnsmasq dropping its privileges), so the next start ends the stale dnsmasq found through its
pid file before starting its own: two DHCP servers never answer for one controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web


@dataclass(frozen=True)
class Backoff:
    """Wait `first` seconds after a death, doubling up to `limit`; a child that ran
    `stable` seconds is healthy again and the next death waits `first`."""

    first: float = 1.0
    limit: float = 30.0
    stable: float = 60.0

    def next(self, previous: float | None, ran_for: float) -> float:
        if previous is None or ran_for >= self.stable:
            return self.first
        return min(self.limit, previous * 2)


def end_stale(pid_file: Path, conf_file: Path, grace: float = 5.0) -> int | None:
    """End a dnsmasq left running by a previous controller (its pid file names it and its command
    line names our configuration); return its pid, or None when there was none."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if f"--conf-file={conf_file}".encode() not in cmdline:
        return None  # the pid was reused by some other process: not ours to end
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return pid


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "dnsmasq",
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.argv = tuple(argv)
        self.name = name
        self.backoff = backoff
        self.clock = clock
        self.log = logging.getLogger(f"sledge.{name}")
        self.starts = 0
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        delay: float | None = None
        while not self._stopping.is_set():
            started = self.clock()
            code = await self._run_once()
            if self._stopping.is_set():
                return
            delay = self.backoff.next(delay, self.clock() - started)
            self.log.warning("%s exited with %s; restarting in %.0f s", self.name, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_once(self) -> int | str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            return f"a start failure ({exc})"
        self._proc, self.pid = proc, proc.pid
        self.starts += 1
        self.log.info("%s started (pid %d, start %d)", self.name, proc.pid, self.starts)
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.log.info("%s", line)
        code = await proc.wait()
        self._proc, self.pid = None, None
        return code

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def cleanup_ctx(supervisor: Supervisor) -> Callable[[web.Application], AsyncIterator[None]]:
    """For app.cleanup_ctx: the child starts with the application and stops with it."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(supervisor.run())
        yield
        await supervisor.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    return ctx
