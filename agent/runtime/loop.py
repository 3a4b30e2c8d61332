"""The job loop: register -> long-poll -> run one job at a time -> stream events -> finish.

A heartbeat thread runs throughout and an event thread while a job runs; the job
itself runs on the loop's thread and keeps going when the controller is away
(its events wait, bounded, in the EventLog). Every call to the controller that
fails is retried with full-jitter backoff. A refused agent token leads to a new
enrollment (a fresh one-time token from the controller's boot script for this
machine's MAC), not to a crash loop.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent import __version__
from agent import protocol as p
from agent.hardware.model import Inventory
from agent.runtime.backoff import Backoff
from agent.runtime.config import AgentConfig
from agent.runtime.errors import AgentError, NoEnrollmentToken
from agent.runtime.eventlog import EventLog
from agent.runtime.jobs import Disks, JobContext, Machine, Outcome, Sources, check_io, failed
from agent.runtime.status import StatusBoard
from agent.runtime.transport import Conflict, Rejected, Transport, TransportError, Unauthorized

# (module, function) of each job, imported when a job of its kind first runs: the writer's and the
# disk code's imports are not on the way from power-on to "registered"
JOBS: dict[p.JobKind, tuple[str, str]] = {
    p.JobKind.DEPLOY: ("agent.runtime.jobs.deploy", "deploy"),
    p.JobKind.VERIFY: ("agent.runtime.jobs.deploy", "verify"),
    p.JobKind.ERASE: ("agent.runtime.jobs.erase", "erase"),
    p.JobKind.INVENTORY: ("agent.runtime.jobs.simple", "inventory"),
    p.JobKind.REBOOT: ("agent.runtime.jobs.simple", "reboot"),
}


def job_function(kind: p.JobKind) -> Callable[[JobContext], Outcome]:
    module, name = JOBS[kind]
    run: Callable[[JobContext], Outcome] = getattr(importlib.import_module(module), name)
    return run


_TOKEN_ARG = re.compile(r"sledge\.token=(\S+)")


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        machine: Machine,
        log: Callable[[str], None] = print,
        stop: threading.Event | None = None,
        backoff: Backoff | None = None,
        *,
        sources: Sources,
        disks: Disks,
        status: StatusBoard | None = None,
    ) -> None:
        check_io(machine, sources, disks)
        self.config = config
        self.transport = transport
        self.machine = machine
        self.sources = sources
        self.disks = disks
        self.log = log
        self.stop = stop or threading.Event()
        self.backoff = backoff or Backoff(cap=config.max_backoff)
        # what the consoles show (agent.runtime.console draws it, when asked to)
        self.status = status or StatusBoard(config.controller, config.mac)
        self.token = ""
        self.machine_id = ""
        self.heartbeat_seconds = config.heartbeat
        self._enrollment = config.token
        self._job: str | None = None
        self._job_cancel = threading.Event()
        self._lock = threading.Lock()
        self._heart: threading.Thread | None = None

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, max_jobs: int | None = None) -> int:
        """Run until stopped (or max_jobs jobs are done); returns the number of jobs run."""
        self._load_token()
        self._heart = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heart.start()
        done = 0
        while not self.stop.is_set() and (max_jobs is None or done < max_jobs):
            if not self.token:
                self._enroll()
                continue
            try:
                assignment = self.transport.next_job(self.token, self.config.poll_wait)
            except Unauthorized as exc:
                self._refused(exc)
                continue
            except TransportError as exc:
                self._pause(f"waiting for a job: {exc}")
                continue
            self.backoff.reset()
            if assignment is not None:
                self.run_job(assignment)
                done += 1
        return done

    def _pause(self, why: str) -> None:
        self.status.error(why)
        delay = self.backoff.next_delay()
        self.log(f"sledge-agent: {why}; retrying in {delay:.1f} s")
        self.stop.wait(delay)

    def _refused(self, exc: Exception) -> None:
        self.log(f"sledge-agent: agent token refused ({exc}); enrolling again")
        self.status.error(f"agent token refused ({exc})")
        with self._lock:
            self.token = ""
        self._forget_token()

    # -- enrollment ----------------------------------------------------------------------------------

    def _state_file(self) -> Path:
        return Path(self.config.state_dir) / "agent.json"

    def _load_token(self) -> None:
        try:
            state = json.loads(self._state_file().read_text())
            self.token, self.machine_id = str(state["agent_token"]), str(state["machine_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        self.status.registered(self.machine_id)

    def _save_token(self) -> None:
        try:
            path = self._state_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"agent_token": self.token, "machine_id": self.machine_id}))
            tmp.chmod(0o600)
            tmp.replace(path)
        except OSError as exc:
            self.log(f"sledge-agent: cannot keep the agent token in {self.config.state_dir}: {exc}")

    def _forget_token(self) -> None:
        self._state_file().unlink(missing_ok=True)

    def _enroll(self) -> None:
        try:
            self._wait_for_network()  # the rest of udev's coldplug is triggered by then
            inv = self.machine.inventory()
            if not self._enrollment:
                self._enrollment = self._fresh_enrollment_token(inv)
            reply = self.transport.register(p.RegisterRequest(self._enrollment, inv, __version__))
        except Unauthorized as exc:
            self._enrollment = ""  # used or expired: ask the controller for a fresh one
            self._pause(f"enrollment refused ({exc})")
            return
        except AgentError as exc:  # the transport, or no token in the boot script
            self._pause(f"cannot register: {exc}")
            return
        with self._lock:
            self.token, self.machine_id = reply.agent_token, reply.machine_id
            self.heartbeat_seconds = min(
                self.config.heartbeat, reply.heartbeat_seconds or self.config.heartbeat
            )
        self._enrollment = ""
        self._save_token()
        self.backoff.reset()
        self.status.registered(reply.machine_id)
        self.log(f"sledge-agent: registered as machine {reply.machine_id}")

    def _wait_for_network(self, every: float = 10.0) -> None:
        """Until config.network_mark exists (the live image: Python's start-up overlaps udev and
        DHCP; /init makes the mark at a lease, or once every NIC has tried a round, and has then
        triggered all of udev's coldplug, which the inventory settles), or the agent is stopped;
        a line every `every` seconds while it waits."""
        mark = Path(self.config.network_mark) if self.config.network_mark else None
        if mark is None or mark.exists():
            return
        started = time.monotonic()
        told = 0
        while not self.stop.is_set() and not mark.exists():
            if time.monotonic() - started >= (told + 1) * every:
                told += 1
                self.log(f"sledge-agent: waiting for the network: no {mark} after {told * every:.0f} s")
            self.stop.wait(0.05)

    def _fresh_enrollment_token(self, inv: Inventory) -> str:
        macs = [self.config.mac] if self.config.mac else [n.mac for n in inv.nics if n.mac]
        for mac in macs:
            script = self.transport.boot_script(mac)
            match = _TOKEN_ARG.search(script)
            if match:
                return match.group(1)
        raise NoEnrollmentToken(f"no enrollment token: the controller's boot script for {macs} carries none")

    # -- heartbeat -----------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.heartbeat_seconds):
            with self._lock:
                token, job = self.token, self._job
            if not token:
                continue
            try:
                reply = self.transport.heartbeat(token, p.Heartbeat(job, "running" if job else "idle"))
            except Unauthorized as exc:
                self._refused(exc)
                continue
            except TransportError:
                continue  # the job goes on; the loop's own calls report the outage
            if job is not None and job in reply.cancel:
                self.log(f"sledge-agent: job {job} cancelled by the controller")
                self._job_cancel.set()

    # -- one job -------------------------------------------------------------------------------------

    def run_job(self, assignment: p.Assignment) -> Outcome:
        events = EventLog(
            assignment.job_id, assignment.attempt, assignment.next_seq, self.config.max_buffered_events
        )
        cancel = threading.Event()
        with self._lock:
            self._job = assignment.job_id
            self._job_cancel = cancel
        sender_stop = threading.Event()
        sender = threading.Thread(target=self._send_events, args=(events, sender_stop, cancel), daemon=True)
        sender.start()

        self.status.job_started(assignment.kind.value, assignment.job_id)

        def emit(kind: p.EventKind, message: str, done: int | None, total: int | None) -> None:
            events.add(kind, message, done, total)
            self.status.job_event(kind, message, done, total)
            self.log(f"[{assignment.kind.value} {assignment.job_id}] {kind.value}: {message}")

        ctx = JobContext(
            assignment,
            self.config,
            self.machine,
            self.sources,
            self.disks,
            emit,
            cancel,
            self._post_inventory,
            lambda message: self.transport.announce(self.token, message),
        )
        emit(p.EventKind.STAGE, f"{assignment.kind.value} started (attempt {assignment.attempt})", None, None)
        try:
            outcome = job_function(assignment.kind)(ctx)
        except Exception as exc:  # a bug in a job must not take the agent down
            outcome = failed(f"{assignment.kind.value} crashed: {type(exc).__name__}: {exc}")
        if cancel.is_set() and outcome.result.outcome is p.Outcome.FAILED:
            emit(p.EventKind.LOG, "stopped: the job was cancelled", None, None)
        kind = p.EventKind.STAGE if outcome.result.outcome is p.Outcome.SUCCEEDED else p.EventKind.ERROR
        emit(
            kind,
            f"{assignment.kind.value} {outcome.result.outcome.value}: {outcome.result.message}",
            None,
            None,
        )
        self.status.job_finished(outcome.result.outcome.value, outcome.result.message)
        sender_stop.set()
        sender.join()
        self._flush(events, cancel)
        finished = self._finish(assignment, outcome)
        with self._lock:
            self._job = None
        if finished and outcome.then is not None and outcome.result.outcome is p.Outcome.SUCCEEDED:
            self.log(f"sledge-agent: {outcome.then.value}")
            self.status.powering(outcome.then.value)
            self.status.wait_drawn(2.0)  # the consoles' last words: how the job ended
            self.machine.power(outcome.then)
        return outcome

    def _post_inventory(self, inv: Inventory) -> None:
        self._retry(lambda: self.transport.post_inventory(self.token, inv), "posting the inventory")

    def _send_once(self, events: EventLog, cancel: threading.Event) -> bool:
        """Send one batch; False when the controller could not take it."""
        batch = events.batch()
        if batch is None:
            return True
        try:
            events.acknowledge(self.transport.post_events(self.token, events.job_id, batch))
            return True
        except Unauthorized as exc:
            self._refused(exc)
        except Conflict as exc:
            self.log(f"sledge-agent: job {events.job_id} moved on ({exc}); stopping it")
            cancel.set()
            events.acknowledge(p.EventAck(batch.events[-1].seq + 1))  # nobody will take them
        except Rejected as exc:
            self.log(f"sledge-agent: events refused ({exc}); dropping that batch")
            events.acknowledge(p.EventAck(batch.events[-1].seq + 1))
        except TransportError:
            pass
        return False

    def _send_events(self, events: EventLog, stop: threading.Event, cancel: threading.Event) -> None:
        backoff = Backoff(base=0.5, cap=self.config.max_backoff)
        while not stop.is_set():
            if self.token and self._send_once(events, cancel):
                backoff.reset()
                stop.wait(0.5)
            else:
                stop.wait(backoff.next_delay())

    def _flush(self, events: EventLog, cancel: threading.Event) -> None:
        while not events.empty() and not self.stop.is_set():
            if not self.token:
                self._enroll()
                continue
            if not self._send_once(events, cancel):
                self._pause("sending events")
            else:
                self.backoff.reset()

    def _finish(self, assignment: p.Assignment, outcome: Outcome) -> bool:
        request = p.FinishRequest(assignment.attempt, outcome.result)
        ok = self._retry(
            lambda: self.transport.finish(self.token, assignment.job_id, request), "finishing the job"
        )
        if ok:
            self.log(f"sledge-agent: job {assignment.job_id} {outcome.result.outcome.value}")
        return ok

    def _retry(self, call: Callable[[], None], what: str) -> bool:
        while not self.stop.is_set():
            if not self.token:
                self._enroll()
                continue
            try:
                call()
                self.backoff.reset()
                return True
            except Unauthorized as exc:
                self._refused(exc)
            except (Conflict, Rejected) as exc:
                self.log(f"sledge-agent: {what}: {exc}; giving up on it")
                return False
            except TransportError as exc:
                self._pause(f"{what}: {exc}")
        return False
