"""Power: BMC records, power actions, the bounded poller, and powering a machine up for a job.

Every BMC call runs in a worker thread of this service's own pool, under asyncio.wait_for with
the policy's timeout, and at most one call per machine is in flight: a BMC that does not answer
holds one worker and its own machine, never the event loop or another machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from agent.protocol import EventKind, JobKind
from controller import jobs
from controller.fleet.agents import controller_event, end_job, machine_event
from controller.fleet.errors import Conflict, NotFound
from controller.fleet.operators import find_machine
from controller.jobs import JobState, MachineState
from controller.power import vault
from controller.power.address import BmcAddress, Protocol, parse
from controller.power.bmc import Bmc, PowerAction
from controller.power.errors import BmcError, PowerError
from controller.state.model import BmcRecord, Machine, PowerState
from controller.state.store import Store

log = logging.getLogger("sledge.power")
T = TypeVar("T")
Connector = Callable[[BmcAddress, str, str, float], Bmc]
MAX_PASSWORD = 256


@dataclass(frozen=True)
class PowerPolicy:
    call_timeout: float = 20.0  # one BMC request, end to end
    poll_interval: float = 60.0  # per machine; many BMCs fall over when polled hard
    boot_deadline: float = 900.0  # from the power cycle until the agent claims the job
    workers: int = 8  # threads for BMC calls, shared by all machines
    tick: float = 5.0  # how often the poller looks for machines that are due


def connect(address: BmcAddress, username: str, password: str, timeout: float) -> Bmc:
    """The real driver for an address; sushy is imported only for a Redfish BMC."""
    if address.protocol is Protocol.REDFISH:
        from controller.power.redfish import RedfishBmc

        return RedfishBmc(address, username, password, timeout)
    from controller.power.ipmi import IpmiBmc

    return IpmiBmc(address, username, password, timeout)


class Power:
    def __init__(
        self,
        store: Store,
        data_dir: Path,
        policy: PowerPolicy = PowerPolicy(),
        clock: Callable[[], float] = time.time,
        notify: Callable[[str], None] = lambda machine_id: None,
        connector: Connector = connect,
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.policy = policy
        self.clock = clock
        self.notify = notify
        self.connector = connector
        self.requests = 0  # BMC calls made (metrics: requests per minute while idle)
        self._busy: set[str] = set()
        self._next_poll: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None

    # -- records ---------------------------------------------------------------------------------

    def set_bmc(self, ref: str, address: str, username: str, password: str) -> tuple[Machine, BmcRecord]:
        parsed = parse(address)
        if not username or len(username) > 64 or any(c.isspace() or c == ":" for c in username):
            raise PowerError(f"BMC user {username[:70]!r}: expected 1-64 characters, no spaces or ':'")
        if not password or len(password) > MAX_PASSWORD or "\n" in password:
            raise PowerError(f"BMC password: expected 1-{MAX_PASSWORD} characters on one line")
        keys = vault.load(self.data_dir)
        with self.store.transaction() as tx:
            machine = find_machine(tx, ref)
            record = BmcRecord(machine.id, str(parsed), username, keys.seal(password, machine.id))
            tx.put_bmc(record)
            machine_event(tx, machine.id, self.clock(), EventKind.STAGE, f"BMC set: {parsed} as {username}")
        self._next_poll.pop(machine.id, None)
        return machine, record

    def delete_bmc(self, ref: str) -> Machine:
        with self.store.transaction() as tx:
            machine = find_machine(tx, ref)
            if tx.bmc(machine.id) is None:
                raise NotFound(f"{machine.label}: has no BMC record")
            tx.delete_bmc(machine.id)
            machine_event(tx, machine.id, self.clock(), EventKind.STAGE, "BMC record removed")
        return machine

    def record(self, ref: str) -> tuple[Machine, BmcRecord]:
        with self.store.transaction() as tx:
            machine = find_machine(tx, ref)
            record = tx.bmc(machine.id)
        if record is None:
            raise Conflict(f"{machine.label}: has no BMC (set one with `sledge machine bmc`)")
        return machine, record

    def records(self) -> dict[str, BmcRecord]:
        with self.store.transaction() as tx:
            return {b.machine_id: b for b in tx.bmcs()}

    # -- calls -----------------------------------------------------------------------------------

    async def _call(self, record: BmcRecord, action: str, fn: Callable[[Bmc], T]) -> T:
        timeout = self.policy.call_timeout
        # one request per BMC at a time: wait (within the timeout) for one in flight, e.g. a poll
        end = time.monotonic() + timeout
        while record.machine_id in self._busy:
            if time.monotonic() >= end:
                raise BmcError(record.address, action, "another request to this BMC is still in progress")
            await asyncio.sleep(0.05)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="bmc")
        # opened here, not earlier: the password is in memory only for the call
        password = vault.load(self.data_dir, create=False).open(record.sealed_password, record.machine_id)

        def run() -> T:
            return fn(self.connector(parse(record.address), record.username, password, timeout))

        loop = asyncio.get_running_loop()
        self._busy.add(record.machine_id)
        self.requests += 1
        work = self._pool.submit(run)

        # the machine stays busy until the worker returns, even past the timeout: a BMC that
        # does not answer holds one worker, not one more per poll
        def free(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the worker was stuck
                loop.call_soon_threadsafe(self._busy.discard, record.machine_id)

        work.add_done_callback(free)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(work), timeout)
        except TimeoutError:
            raise BmcError(record.address, action, f"no answer within {timeout:g} s") from None

    def _remember(self, machine_id: str, power: PowerState, error: str = "") -> BmcRecord | None:
        with self.store.transaction() as tx:
            record = tx.bmc(machine_id)
            if record is None:  # removed meanwhile
                return None
            record = replace(record, power=power, power_at=self.clock(), power_error=error)
            tx.put_bmc(record)
            return record

    async def act(self, ref: str, action: PowerAction) -> BmcRecord:
        """An operator's `sledge power ACTION`: the record with the power state it left."""
        machine, record = self.record(ref)
        try:
            if action is PowerAction.STATUS:
                state = await self._call(record, "power status", lambda b: b.power_state())
            else:
                methods = {
                    PowerAction.ON: lambda b: b.power_on(),
                    PowerAction.OFF: lambda b: b.power_off(),
                    PowerAction.CYCLE: lambda b: b.power_cycle(),
                }
                await self._call(record, f"power {action}", methods[action])
                state = PowerState.OFF if action is PowerAction.OFF else PowerState.ON
        except BmcError as exc:
            self._remember(machine.id, PowerState.UNKNOWN, exc.words)
            raise
        if action is not PowerAction.STATUS:
            with self.store.transaction() as tx:
                machine_event(
                    tx, machine.id, self.clock(), EventKind.STAGE, f"power {action} via {record.address}"
                )
        return self._remember(machine.id, state) or record

    # -- the poller ------------------------------------------------------------------------------

    def due(self, records: dict[str, BmcRecord], now: float) -> list[BmcRecord]:
        """Records whose next poll time has come (a new one is first due at a random point of the
        interval, so a restart does not ask every BMC at once); the next time is set jittered."""
        interval = self.policy.poll_interval
        for gone in set(self._next_poll) - set(records):
            del self._next_poll[gone]
        out = []
        for machine_id, record in records.items():
            at = self._next_poll.setdefault(machine_id, now + random.uniform(0, interval))
            if at <= now and machine_id not in self._busy:
                out.append(record)
                self._next_poll[machine_id] = now + interval * random.uniform(0.9, 1.1)
        return out

    async def poll_once(self, record: BmcRecord) -> None:
        try:
            state = await self._call(record, "power status", lambda b: b.power_state())
        except (PowerError, OSError) as exc:
            words = exc.words if isinstance(exc, BmcError) else str(exc)
            self._remember(record.machine_id, PowerState.UNKNOWN, words)
            log.warning("%s", exc)
            return
        self._remember(record.machine_id, state)

    async def poll_loop(self) -> None:
        while True:
            try:
                for record in self.due(self.records(), self.clock()):
                    self._spawn(self.poll_once(record))
            except Exception:
                log.exception("power poller")
            await asyncio.sleep(self.policy.tick)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- jobs ------------------------------------------------------------------------------------

    def job_created(self, job_id: str) -> None:
        """A deploy or erase for a machine with a BMC: bring its agent up (in the background)."""
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            record = tx.bmc(job.machine_id) if job else None
        if job is not None and record is not None and job.kind in (JobKind.DEPLOY, JobKind.ERASE):
            self._spawn(self.boot_for_job(job_id))

    def job_requeued(self, job_id: str) -> None:
        """A job re-queued after its agent vanished (lease expired): the machine is on but its agent
        is gone (hung, crashed, powered off by hand), so nothing will claim the job unless the machine
        is booted to a new agent: the same power-up, without trusting "it is on"."""
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            record = tx.bmc(job.machine_id) if job else None
        if job is not None and record is not None and job.kind in (JobKind.DEPLOY, JobKind.ERASE):
            self._spawn(self.boot_for_job(job_id, agent_lost=True))

    def _job_event(self, job_id: str, kind: EventKind, message: str) -> None:
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            if job is not None:
                controller_event(tx, job, self.clock(), kind, message)
        self.notify(job.machine_id if job else "")

    def _fail_job(self, job_id: str, reason: str) -> None:
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            if job is None or job.state is not JobState.QUEUED:
                return  # claimed, cancelled or ended meanwhile: nothing to fail
            end_job(
                tx, job, jobs.fail_unclaimed(job.id, job.status, reason), self.clock(), f"failed: {reason}"
            )
        self.notify(job.machine_id)

    def _job_state(self, job_id: str) -> tuple[JobState | None, MachineState | None]:
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            machine = tx.machine(job.machine_id) if job else None
        return (job.state if job else None), (machine.state if machine else None)

    async def boot_for_job(self, job_id: str, agent_lost: bool = False) -> None:
        """A machine that is off or runs its own OS (or, `agent_lost`, whose agent vanished mid-job):
        one-time network boot, power cycle, and wait for its agent to claim the job, each step an
        event; a failure ends the job with the BMC's words."""
        state, machine_state = self._job_state(job_id)
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            record = tx.bmc(job.machine_id) if job else None
        if state is not JobState.QUEUED or record is None:
            return
        try:
            if agent_lost:
                lost = f"power: the agent was lost; booting a new one ({record.address})"
                self._job_event(job_id, EventKind.STAGE, lost)
            elif machine_state is not MachineState.DEPLOYED:
                power = await self._call(record, "power status", lambda b: b.power_state())
                self._remember(record.machine_id, power)
                if power is not PowerState.OFF:
                    return  # on and not running its own OS: its agent is already there or on the way
                self._job_event(job_id, EventKind.STAGE, f"power: the machine is off ({record.address})")
            self._job_event(job_id, EventKind.STAGE, f"power: one-time network boot via {record.address}")
            await self._call(record, "set one-time network boot", lambda b: b.boot_from_network_once())
            if self._job_state(job_id)[0] is not JobState.QUEUED:
                return  # claimed meanwhile (a lost agent came back) or cancelled: no reset under it
            self._job_event(job_id, EventKind.STAGE, f"power: cycle via {record.address}")
            await self._call(record, "power cycle", lambda b: b.power_cycle())
            self._remember(record.machine_id, PowerState.ON)
        except (BmcError, PowerError) as exc:
            words = exc.words if isinstance(exc, BmcError) else str(exc)
            self._remember(record.machine_id, PowerState.UNKNOWN, words)
            self._fail_job(job_id, str(exc))
            return
        deadline = self.policy.boot_deadline
        self._job_event(job_id, EventKind.STAGE, f"power: waiting up to {deadline:g} s for the agent")
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            state, _ = self._job_state(job_id)
            if state is not JobState.QUEUED:
                return
            await asyncio.sleep(min(1.0, max(0.05, end - time.monotonic())))
        self._fail_job(
            job_id, f"no agent claimed the job within {deadline:g} s of the power cycle via {record.address}"
        )
