"""Section D (issue 5): a real `sledge serve` under N simulated agents on 127.0.0.1.

This process plays every agent through one aiohttp session (keep-alive, no connection limit):
it enrolls them all (boot script + register, bounded concurrency, timed on its own), then for S
seconds each heartbeats every 10 s (first beat at a random point of the first period) and keeps
one long-poll open, while a feeder creates inventory jobs for idle machines at a steady rate
through the operator API; an agent that gets one posts events, its inventory and a result, as
the real agent does. Requests are open-loop (on a schedule, not after the previous answer), and
latency is client-side: send to body read. The controller and this generator share the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import resource
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
from lab import Controller

from agent.hardware.model import Cpu, Inventory, Memory, Nic, System
from agent.protocol import (
    HEARTBEAT_PATH,
    INVENTORY_PATH,
    NEXT_JOB_PATH,
    REGISTER_PATH,
    job_events_path,
    job_finish_path,
)
from benchlib.proc import BenchError, log
from benchlib.report import Target

TOKEN = re.compile(r"sledge\.token=(\S+)")
ENROLL_KINDS = ("boot script", "register")
STEADY_KINDS = ("heartbeat", "create job (operator)", "events", "inventory", "finish")
DELIVERY = "job delivery: created -> agent has it"
IDLE_POLL = "long-poll 204: time past `wait`"
TARGET_MS = 100.0
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class LoadConfig:
    agents: int = 2000
    seconds: float = 60.0
    heartbeat: float = 10.0
    poll_wait: float = 25.0
    job_rate: float = 20.0  # jobs created per second
    enroll_concurrency: int = 32
    think: tuple[float, float] = (0.2, 1.0)  # seconds an agent spends on each step of a job


@dataclass
class Agent:
    index: int
    mac: str
    inventory: dict[str, object]
    machine_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    live: bool = False  # its long-poll loop has started
    busy: bool = False  # the feeder made it a job that it has not finished
    job_id: str | None = None  # the job it is running (heartbeats name it)
    job_asked: float = 0.0  # loop time the feeder sent the create request


class Recorder:
    """Latencies (seconds) and errors per kind; no per-request logging."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.first_error: dict[str, str] = {}
        self.requests = 0  # every HTTP request answered in the steady phase, long-polls included

    def fail(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        self.first_error.setdefault(kind, what)


class Client:
    """One request = one timed call; errors and unexpected statuses are counted, not raised."""

    def __init__(self, session: aiohttp.ClientSession, base: str, rec: Recorder) -> None:
        self.session, self.base, self.rec = session, base, rec

    async def call(
        self,
        kind: str,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: object = None,
        ok: tuple[int, ...] = (200,),
        timeout: float = 30.0,
        timed: bool = True,
    ) -> tuple[int, bytes] | None:
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        t0 = time.monotonic()
        try:
            async with self.session.request(
                method,
                self.base + path,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.rec.fail(kind, f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.rec.requests += 1
        if status not in ok:
            self.rec.fail(kind, f"{method} {path}: HTTP {status}: {raw[:200]!r}")
            return None
        if timed:
            self.rec.latency[kind].append(time.monotonic() - t0)
        return status, raw


def make_agents(n: int) -> list[Agent]:
    """n machines with distinct DMI UUIDs and MACs (52:54:00:xx:xx:xx, 16M of them)."""
    agents = []
    for i in range(n):
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))
        system = System(
            "QEMU",
            "Standard PC",
            f"S{i}",
            f"4c4c4544-0000-1000-8000-{i:012x}",
            None,
            None,
            None,
            "uefi",
            None,
            f"load{i}",
        )
        nic = Nic("eth0", mac, mac, "virtio_net", None, 1000, True, 1500, True, ())
        inventory = Inventory(
            1, system, Cpu("cpu", "x86_64", 1, 2, 2, ()), Memory(1 << 30, None, ()), (), (nic,), (), None
        )
        agents.append(Agent(i, mac, inventory.to_wire()))
    return agents


# -- phase 1: enrollment -----------------------------------------------------------------------------


async def enroll(client: Client, agent: Agent) -> None:
    got = await client.call("boot script", "GET", f"/boot/ipxe?mac={agent.mac}")
    match = TOKEN.search(got[1].decode()) if got else None
    if got and not match:
        client.rec.fail("boot script", f"no sledge.token= in the script for {agent.mac}")
    if not match:
        return
    body = {"enrollment_token": match.group(1), "inventory": agent.inventory, "agent_version": "loadbench"}
    got = await client.call("register", "POST", REGISTER_PATH, JSON, body)
    if got:
        reply = json.loads(got[1])
        agent.machine_id = reply["machine_id"]
        agent.headers = {**JSON, "Authorization": f"Bearer {reply['agent_token']}"}


async def enroll_all(client: Client, agents: list[Agent], concurrency: int) -> None:
    queue = iter(agents)

    async def worker() -> None:
        for agent in queue:
            await enroll(client, agent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- phase 2: steady load ------------------------------------------------------------------------------


async def sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))


async def heartbeats(client: Client, agent: Agent, first: float, deadline: float, period: float) -> None:
    when = first
    while when < deadline:
        await sleep_until(when)
        beat = {"job_id": agent.job_id, "status": "running" if agent.job_id else "idle"}
        await client.call("heartbeat", "POST", HEARTBEAT_PATH, agent.headers, beat)
        when += period


async def polls(client: Client, agent: Agent, first: float, deadline: float, cfg: LoadConfig) -> None:
    """Long-poll with the full `wait` until the deadline, then drop the open poll (not shorten it:
    2,000 polls ending together at the deadline would be a burst no real fleet makes)."""
    loop = asyncio.get_running_loop()
    await sleep_until(first)
    agent.live = True
    path, wait = f"{NEXT_JOB_PATH}?wait={cfg.poll_wait:g}", cfg.poll_wait
    while (left := deadline - loop.time()) > 0:
        t0 = loop.time()
        poll = client.call(
            "long-poll", "GET", path, agent.headers, ok=(200, 204), timeout=wait + 30, timed=False
        )
        try:
            got = await asyncio.wait_for(poll, left)
        except TimeoutError:
            break
        if got is None:
            await asyncio.sleep(1.0)  # as the real agent backs off
        elif got[0] == 204:
            client.rec.latency[IDLE_POLL].append(loop.time() - t0 - wait)
        else:
            if agent.busy:
                client.rec.latency[DELIVERY].append(loop.time() - agent.job_asked)
            await run_job(client, agent, json.loads(got[1]), cfg)
    agent.live = False


async def run_job(client: Client, agent: Agent, assignment: dict[str, object], cfg: LoadConfig) -> None:
    """An inventory job as the agent runs it: a stage event, the inventory, a log and a stage, the result."""
    job_id, attempt, seq = str(assignment["job_id"]), assignment["attempt"], assignment["next_seq"]
    assert isinstance(seq, int)
    agent.job_id = job_id

    def event(n: int, kind: str, message: str) -> dict[str, object]:
        return {"seq": seq + n, "at": time.time(), "kind": kind, "message": message}

    try:
        await asyncio.sleep(random.uniform(*cfg.think))
        first = {"attempt": attempt, "events": [event(0, "stage", "inventory: probing hardware")]}
        await client.call("events", "POST", job_events_path(job_id), agent.headers, first)
        await asyncio.sleep(random.uniform(*cfg.think))
        await client.call("inventory", "POST", INVENTORY_PATH, agent.headers, agent.inventory)
        done = [event(1, "log", "0 disks, 1 NICs, 1073741824 bytes"), event(2, "stage", "inventory: done")]
        second = {"attempt": attempt, "events": done}
        await client.call("events", "POST", job_events_path(job_id), agent.headers, second)
        await asyncio.sleep(random.uniform(*cfg.think))
        result = {"outcome": "succeeded", "message": "0 disks, 1 NICs, 1073741824 bytes"}
        finish = {"attempt": attempt, "result": result}
        await client.call("finish", "POST", job_finish_path(job_id), agent.headers, finish)
    finally:
        agent.job_id = None
        agent.busy = False


@dataclass
class JobCount:
    created: int = 0
    skipped: int = 0  # feeder ticks that found no idle agent


async def feeder(
    client: Client,
    agents: list[Agent],
    operator: dict[str, str],
    start: float,
    stop: float,
    rate: float,
    count: JobCount,
) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def create(agent: Agent) -> None:
        body = {"machine": agent.mac, "kind": "inventory"}
        if await client.call("create job (operator)", "POST", "/v1/jobs", operator, body, ok=(201,)):
            count.created += 1
        elif agent.job_id is None:
            agent.busy = False

    tick = 0
    while (when := start + tick / rate) < stop:
        tick += 1
        await sleep_until(when)
        agent = next((a for a in random.sample(agents, min(10, len(agents))) if a.live and not a.busy), None)
        if agent is None:
            count.skipped += 1
            continue
        agent.busy, agent.job_asked = True, loop.time()
        task = asyncio.create_task(create(agent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


# -- the controller, watched from outside ----------------------------------------------------------------


@dataclass
class Watch:
    rss_idle: int = 0
    rss_enrolled: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    fds_peak: int = 0
    fd_limit: int = 0
    cpu_steady: float = 0.0  # seconds of CPU in the steady phase
    gen_cpu_steady: float = 0.0


async def sample(proc: psutil.Process, watch: Watch) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):  # drive() reports a controller that went away
        while True:
            watch.rss_peak = max(watch.rss_peak, proc.memory_info().rss)
            watch.fds_peak = max(watch.fds_peak, proc.num_fds())
            await asyncio.sleep(1.0)


async def server_p99_bound(client: Client, before: dict[str, float] | None = None) -> dict[str, float]:
    """The controller's own latency histogram (/metrics, handler time) for the steady kinds' routes."""
    got = await client.call("metrics", "GET", "/metrics", timed=False)
    counts: dict[str, float] = defaultdict(float)
    for line in (got[1].decode() if got else "").splitlines():
        if not line.startswith("sledge_http_request_seconds_bucket") or "jobs/next" in line:
            continue
        if "/v1/agent/" in line or 'route="/v1/jobs"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[le] += float(line.rsplit(" ", 1)[1])
    return {le: n - (before or {}).get(le, 0.0) for le, n in counts.items()}


def bucket_p99(hist: dict[str, float]) -> str:
    total = hist.get("+Inf", 0.0)
    for le in sorted((k for k in hist if k != "+Inf"), key=float):
        if total and hist[le] >= 0.99 * total:
            return f"<= {float(le) * 1000:.0f} ms"
    return "n/a"


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Result:
    rec: Recorder
    watch: Watch
    jobs: JobCount
    enroll_seconds: float
    enrolled: int
    steady_seconds: float
    finished: int
    server_p99: str


async def drive(controller: Controller, cfg: LoadConfig) -> Result:
    assert controller.proc is not None
    proc = psutil.Process(controller.proc.pid)
    watch = Watch(rss_idle=proc.memory_info().rss, fd_limit=proc.rlimit(psutil.RLIMIT_NOFILE)[0])
    if watch.fd_limit < cfg.agents + 256:
        log(f"warning: the controller's open-file limit is {watch.fd_limit}, below {cfg.agents} agents")
    enroll_rec, rec = Recorder(), Recorder()
    agents = make_agents(cfg.agents)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        sampler = asyncio.create_task(sample(proc, watch))
        log(f"load: enrolling {cfg.agents} agents, {cfg.enroll_concurrency} at a time")
        t0 = time.monotonic()
        await enroll_all(Client(session, controller.url, enroll_rec), agents, cfg.enroll_concurrency)
        enroll_seconds = time.monotonic() - t0
        agents = [a for a in agents if a.machine_id]
        if not agents:
            raise BenchError(f"load: no agent registered: {enroll_rec.first_error}")
        watch.rss_enrolled = proc.memory_info().rss
        log(f"load: {len(agents)} enrolled in {enroll_seconds:.1f} s; steady phase for {cfg.seconds:.0f} s")
        client = Client(session, controller.url, rec)
        before = await server_p99_bound(client)
        rec.requests = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + cfg.seconds
        cpu0, gen0 = cpu_seconds(proc), own_cpu_seconds()
        jobs = JobCount()
        operator = {**JSON, "Authorization": f"Bearer {controller.operator}"}
        tasks = []
        for agent in agents:
            first = start + random.uniform(0, cfg.heartbeat)
            tasks.append(heartbeats(client, agent, first, deadline, cfg.heartbeat))
            tasks.append(polls(client, agent, first, deadline, cfg))
        # from when half the agents are polling to when the last job can finish before the end
        margin = min(cfg.heartbeat / 2, cfg.seconds / 4)
        feed_start, feed_stop = start + margin, deadline - margin
        tasks.append(feeder(client, agents, operator, feed_start, feed_stop, cfg.job_rate, jobs))
        await asyncio.gather(*tasks)
        steady = loop.time() - start
        watch.cpu_steady, watch.gen_cpu_steady = cpu_seconds(proc) - cpu0, own_cpu_seconds() - gen0
        watch.rss_end = proc.memory_info().rss
        server = bucket_p99(await server_p99_bound(client, before))
        sampler.cancel()
    rec.latency.update(enroll_rec.latency)
    rec.errors.update(enroll_rec.errors)
    rec.first_error = {**enroll_rec.first_error, **rec.first_error}
    finished = len(rec.latency["finish"])
    return Result(rec, watch, jobs, enroll_seconds, len(agents), steady, finished, server)


# -- report -----------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


def report(r: Result, cfg: LoadConfig) -> tuple[list[str], list[Target]]:
    lat, err = r.rec.latency, r.rec.errors
    steady = [x for k in STEADY_KINDS for x in lat[k]]
    steady_errors = sum(err[k] for k in STEADY_KINDS) + err["long-poll"]
    p99 = percentile(steady, 0.99) * 1000

    def row(label: str, values: list[float], errors: int | str = "") -> str:
        ms = [f"{percentile(values, q) * 1000:.1f}" if values else "" for q in (0.5, 0.99, 1.0)]
        return f"| {label} | {len(values)} | {errors} | {' | '.join(ms)} |"

    mb = 1e6
    w = r.watch
    lines = [
        f"{r.enrolled} agents enrolled; steady phase {r.steady_seconds:.0f} s: heartbeat every"
        f" {cfg.heartbeat:.0f} s, one long-poll each (`wait={cfg.poll_wait:.0f}`), {cfg.job_rate:.0f}"
        " inventory jobs/s. Latency is client-side (send to body read) in a generator that shares"
        " the cores with the controller.",
        "",
        "| request | count | errors | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(row(f"enrolment: {k}", lat[k], err[k]) for k in ENROLL_KINDS),
        *(row(f"steady: {k}", lat[k], err[k]) for k in STEADY_KINDS),
        row("**steady: all of the above**", steady, steady_errors),
        row(DELIVERY, lat[DELIVERY]),
        row(IDLE_POLL, lat[IDLE_POLL], err["long-poll"]),
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| enrolment | {r.enrolled} agents in {r.enroll_seconds:.1f} s"
        f" ({r.enrolled / r.enroll_seconds:.0f}/s, {cfg.enroll_concurrency} at a time) |",
        f"| steady requests/s | {r.rec.requests / r.steady_seconds:.0f} (long-poll answers included),"
        f" {len(steady) / r.steady_seconds:.0f} without them |",
        f"| jobs | {r.jobs.created} created, {r.finished} finished,"
        f" {r.jobs.created - len(lat[DELIVERY])} not delivered;"
        f" {r.jobs.skipped} feeder ticks found no idle agent |",
        f"| controller RSS | {w.rss_idle / mb:.0f} MB idle, {w.rss_enrolled / mb:.0f} MB enrolled,"
        f" peak {w.rss_peak / mb:.0f} MB, {w.rss_end / mb:.0f} MB at the end |",
        f"| CPU, steady phase (% of one core) | controller {100 * w.cpu_steady / r.steady_seconds:.0f}%,"
        f" generator {100 * w.gen_cpu_steady / r.steady_seconds:.0f}% (of {psutil.cpu_count()} cores) |",
        f"| controller open files | peak {w.fds_peak} (soft limit {w.fd_limit}) |",
        f"| controller-side p99, steady (its /metrics histogram, handler time only) | {r.server_p99} |",
    ]
    for kind, what in sorted(r.rec.first_error.items()):
        lines.append(f"| first error, {kind} ({err[kind]}) | {what[:160]} |")
    ok = p99 < TARGET_MS and steady_errors == 0 and r.enrolled == cfg.agents
    target = Target(
        f"controller p99 at {cfg.agents} agents (steady, non-long-poll requests, errors)",
        f"< {TARGET_MS:.0f} ms, 0 errors",
        f"{p99:.1f} ms, {steady_errors} errors, {cfg.agents - r.enrolled} not enrolled",
        ok,
    )
    return lines, [target]


def raise_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"open-file limit: hard limit {hard}, need {needed} for the agents' connections")


def run_load_bench(work: Path, cfg: LoadConfig) -> tuple[list[str], list[Target]]:
    controller = Controller(work / "data")
    try:
        # started before we raise our own limit, so the report shows what `sledge serve` made of it
        controller.start()
        log(f"load: sledge serve on {controller.url} (pid {controller.proc.pid if controller.proc else '?'})")
        raise_open_file_limit(cfg.agents + 256)
        result = asyncio.run(drive(controller, cfg))
    except RuntimeError as exc:  # lab.Controller: it did not start; the message holds serve.log's tail
        raise BenchError(f"load: {exc}") from None
    except psutil.NoSuchProcess:
        tail = (work / "data" / "serve.log").read_text()[-800:]
        raise BenchError(f"load: sledge serve exited under load; serve.log ends: {tail}") from None
    finally:
        controller.stop()
        log("load: sledge serve stopped")
    return report(result, cfg)
