"""Section G (issue 15): a simulated fleet deploying one image at once, its agents spread over a few
worker processes (PROCS, one per core by default), the tracker and the origin in this one.

Every agent runs the product's own code: the writer's pipeline (fetch, verify, write) into a
sparse file of its own, its PeerSession (peer server, peer source, swarm order, announces), and
the controller's Tracker (called through a pipe from each worker, one call at a time, as one
controller answers).
Each agent has its own download cap and upload cap (token buckets in its sources and its peer
server), the origin's egress is capped by a token bucket too, and the origin counts what it sends.
Cases: origin only, peers, peers with 5% of agents slowed to a tenth of the cap, peers with 10% of
agents killed halfway, peers with one agent serving corrupted bytes. Printed as multiples of S/B
(S = image stored bytes, B = per-agent cap) beside the issue's targets.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier as MpBarrier
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from agent.image.manifest import ChunkKind, Manifest
from agent.peer.bucket import TokenBucket
from agent.peer.server import PeerServer, ServeLimits
from agent.peer.session import PeerConfig, PeerSession
from agent.peer.source import CappedSource, PeerOptions
from agent.peer.swarm import PeerDropped
from agent.protocol import Announce, AnnounceReply
from agent.writer.device import open_target
from agent.writer.fetch import RetryPolicy
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.sources import ChunkSource, HttpSource, Timeouts
from benchlib.fleetfloor import floor
from controller.config import Config
from controller.fleet.tracker import Tracker, TrackerPolicy
from controller.images.importer import ImportOptions, import_image
from controller.images.sources import RawSource
from controller.images.store import WritableStore

MiB = 1 << 20
# an origin shared by a whole fleet is slow per request by design: not a stall
PATIENT_HTTP = Timeouts(connect=10.0, stall=60.0, min_rate=4 << 10)
# fetching threads per agent: one fetches from peers (PeerOptions.parallel), one more keeps the
# origin share going; more only wake up to wait (200 agents x 6 threads cost CPU the bench lacks)
WORKERS = int(os.environ.get("WORKERS", "3"))  # WORKERS=... to try others in development
# seconds between announces: the controller's own setting (ANNOUNCE=... to try others in development)
ANNOUNCE = float(os.environ.get("ANNOUNCE", str(Config.announce_seconds)))
# the product's defaults (ServeLimits.uploads, PeerOptions.parallel); UPLOADS=, PARALLEL= in development
UPLOADS = int(os.environ.get("UPLOADS", str(ServeLimits.uploads)))
PARALLEL = int(os.environ.get("PARALLEL", str(PeerOptions.parallel)))
# seconds without progress before an agent's fetches go to the origin (stalled); 20 s, not the
# product's 30, at S/B = 32 s; PATIENCE=... (read by each worker process too, as it is spawned)
PATIENCE = float(os.environ.get("PATIENCE", "20"))
# worker processes the simulated agents are spread over: one process's threads share one
# interpreter lock, so one process never used more than ~1.3 cores however many the machine has
# (two processes of 50 agents each, side by side, ran as fast as one alone); and each agent has a
# dozen threads, so a process of 100 agents hands its lock around ~1,200 threads: at N = 200 on
# 2 cores, 2 workers gave p50 1.69 S/B (3.39 on a slower evening; 35-50k context switches a
# second, most of the kernel's time in futex and task switches), 8 workers 1.42, 16 workers 1.37,
# 32 workers 1.42 (2026-12-07, one run each; at N = 100, 2 or 8 workers differ by ~0.02). Hence
# one worker per core and at least one per AGENTS_PER_PROC agents; PROCS=... sets a fixed count
# (development)
AGENTS_PER_PROC = 13
PROCS = int(os.environ.get("PROCS", "0"))


def worker_count(n: int, cores: int | None = None) -> int:
    """Worker processes for n agents: PROCS if set, else one per core and one per AGENTS_PER_PROC
    agents, whichever is more (never more than the agents)."""
    if PROCS > 0:
        return max(1, min(PROCS, n))
    cores = cores if cores is not None else os.cpu_count() or 1
    return max(1, min(n, max(cores, -(-n // AGENTS_PER_PROC))))


_CHUNK = re.compile(r"/chunks/[0-9a-f]{2}/[0-9a-f]{64}")


# -- the origin ------------------------------------------------------------------------------------------


class _OriginHandler(BaseHTTPRequestHandler):
    server: Origin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if not _CHUNK.fullmatch(self.path):
            self.send_error(404)
            return
        data = self.server.chunks.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        view = memoryview(data)
        for start in range(0, len(data), 256 << 10):
            piece = view[start : start + (256 << 10)]
            self.server.bucket.take(len(piece))
            self.wfile.write(piece)
        with self.server.lock:
            self.server.sent += len(data)


class Origin(ThreadingHTTPServer):
    """The store's chunks from memory, behind one egress cap, counting the bytes sent."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, store: Path, egress: float) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.chunks = {
            "/" + str(p.relative_to(store)): p.read_bytes()
            for p in (store / "chunks").rglob("*")
            if p.is_file()
        }
        self.bucket = TokenBucket(egress, burst=256 << 10)
        self.lock = threading.Lock()
        self.sent = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, args=(0.2,), daemon=True).start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # an agent that hung up

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class SilentServer(PeerServer):
    """A peer that claims every chunk and serves none: every ask gets 503 (a disturbed case, not
    product code). Before the tracker counted only claims other agents vouched for, it stalled the
    swarm: origin 5.19 S, p50 3.1-3.3 S/B at N = 100."""

    def _send(self, h, index, offset, length, digest):  # type: ignore[no-untyped-def]
        h._reply(503, "upload slots full\n", {"Retry-After": "1"})


class CorruptingServer(PeerServer):
    """A peer that flips one byte of every chunk it sends (the disturbed case, not product code)."""

    def _send(self, h, index, offset, length, digest):  # type: ignore[no-untyped-def]
        data = bytearray(os.pread(self.fd, length, offset))
        data[length // 2] ^= 0x01
        h.send_response(200)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(bytes(data))


# -- one simulated agent -----------------------------------------------------------------------------------


@dataclass
class SimAgent:
    index: int
    path: Path
    rate: float  # download and upload cap, bytes/s
    peers: bool
    corrupt: bool = False
    silent: bool = False  # (with corrupt) it answers 503 instead of serving flipped bytes
    kill_at: float | None = None  # seconds after the start
    slow: bool = False  # at a tenth of the cap: stopped once the others are done (not measured)
    seconds: float | None = None
    error: str = ""
    dropped: list[PeerDropped] = field(default_factory=list)
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    url: str = ""
    declined: dict[str, int] = field(default_factory=dict)
    busy_answers: int = 0  # its asks that found a peer busy (503)

    @property
    def host(self) -> str:
        """Its own loopback address, as a real agent has its own: peers count connections by it."""
        return f"127.1.{(self.index + 1) >> 8 & 255}.{(self.index + 1) & 255}"


@dataclass(frozen=True)
class Case:
    name: str
    agents: int
    peers: bool
    slow: float = 0.0  # share of agents at a tenth of the cap
    killed: float = 0.0  # share of agents killed halfway
    corrupt: bool = False
    mirror: bool = False  # the agents' source is one nginx caching mirror in front of the origin
    silent: bool = False  # the corrupting agent serves nothing instead: every ask gets 503


@dataclass
class Result:
    """One run of one case (the real namespace case, benchlib/fleetreal.py, reads the same fields)."""

    case: Case
    origin_bytes: int
    times: list[float]  # seconds to complete, agents that were not killed
    failed: list[str]
    bad_targets: int
    corrupt_met: int = 0  # agents that asked the corrupting peer
    corrupt_dropped: int = 0  # ... and dropped it
    corrupt_bytes_kept: int = 0  # bytes from it that any writer took (must be 0)
    drops: dict[str, int] = field(default_factory=dict)  # why agents dropped peers, counted
    busy_per_chunk: float = 0.0  # asks that found a peer busy, per chunk fetched from peers
    lapsed: int = 0  # agents whose claims the tracker stopped counting: no agent vouched for them
    # CPU seconds (user + system) the worker processes used, all agents together (in the mirror case
    # also nginx's and `sledge mirror-config`'s: every child the case waited for)
    cpu: float = 0.0


FleetResult = Result  # the name the other sections and the real case use


def run_case(
    work: Path,
    store: Path,
    manifest: Manifest,
    digest: str,
    image_sha: str,
    case: Case,
    rate: float,
    egress: float,
) -> Result:
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(case.agents * 7 + len(case.name))
    n = case.agents
    order = list(range(n))
    rng.shuffle(order)
    slow = set(order[: round(case.slow * n)])
    killed = set(order[round(case.slow * n) : round(case.slow * n) + round(case.killed * n)])
    corrupt = order[-1] if case.corrupt else -1
    s_over_b = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA) / rate
    agents = [
        SimAgent(
            i,
            work / f"t{i}.img",
            rate / 10 if i in slow else rate,
            case.peers,
            corrupt=i == corrupt,
            silent=i == corrupt and case.silent,
            slow=i in slow,
            kill_at=s_over_b / 2 if i in killed else None,
        )
        for i in range(n)
    ]
    # the agents run in worker_count(n) worker processes (spawned, not forked: a fork copies whatever lock
    # another thread of this process holds at that moment), the tracker and the origin here; each
    # worker's announces come through a pipe (_RemoteTracker)
    ctx = multiprocessing.get_context("spawn")
    procs = worker_count(n)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers' CPU: what they add to it
    run = Run(
        manifest,
        digest,
        rate,
        ctx.Barrier(n + 1),
        ctx.Event(),
        ctx.Value("d", 0.0),
        Countdown(ctx, sum(1 for a in agents if not a.corrupt and not a.slow)),
    )
    workers: list[tuple[BaseProcess, Connection, Connection]] = []
    for w in range(procs):
        here, there = ctx.Pipe()  # the origin's url in, the agents' results out
        tracker_here, tracker_there = ctx.Pipe()  # announces in, replies out
        worker = ctx.Process(
            target=_worker,
            args=(agents[w::procs], there, tracker_there, run),
            daemon=True,
        )
        worker.start()
        there.close()
        tracker_there.close()
        workers.append((worker, here, tracker_here))
    tracker = Tracker(TrackerPolicy(interval=ANNOUNCE))  # the default ttl, 30 s: killed agents say they leave
    lock = threading.Lock()
    origin = Origin(store, egress)
    mirror = None
    source_url = origin.url
    try:
        if case.mirror:
            from benchlib.fleetmirror import Mirror  # scripts/ on the path: bench.py's, not this file's

            mirror = Mirror(work / "mirror", origin.url, egress)
            mirror.__enter__()
            source_url = mirror.url
        for _, here, tracker_here in workers:
            threading.Thread(target=_serve_tracker, args=(tracker, lock, tracker_here), daemon=True).start()
            here.send(source_url)
        run.gate.wait(600)  # every agent has its session up and has announced once
        run.t0.value = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        run.go.set()
        by_index = {a.index: a for a in agents}
        for proc, here, _ in workers:
            if not here.poll(3600):
                raise RuntimeError(f"fleet worker {proc.pid}: no results in an hour")
            try:
                results: list[SimAgent] = here.recv()
            except EOFError:
                proc.join(10)
                raise RuntimeError(
                    f"fleet worker {proc.pid} ended (exit code {proc.exitcode}) without its agents'"
                    " results, expected one per agent (its traceback is above)"
                ) from None
            for done in results:
                by_index[done.index] = done
            proc.join(10)  # its agents are done; a thread that lingers is killed below
        agents = [by_index[i] for i in range(n)]
    finally:
        for proc, here, tracker_here in workers:
            if proc.is_alive():
                proc.kill()
                proc.join(10)  # reaped: its CPU counts below
            here.close()
            tracker_here.close()
        if mirror is not None:
            mirror.__exit__(None, None, None)
        origin.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    # the others' times: not the killed, the corrupting, nor the slowed agents (the issue's targets
    # are about what a few bad agents do to everyone else)
    times = [
        a.seconds
        for a in agents
        if a.kill_at is None and a.seconds is not None and not a.corrupt and a.index not in slow
    ]
    failed = [f"agent {a.index}: {a.error}" for a in agents if a.error and a.kill_at is None and not a.slow]
    bad = 0
    for a in agents:
        if (
            a.kill_at is None
            and not a.slow
            and not a.corrupt
            and not a.error
            and sha_of(a.path, manifest.image_size) != image_sha
        ):
            bad += 1
        a.path.unlink(missing_ok=True)
    drops: dict[str, int] = {}
    for a in agents:
        for d in a.dropped:
            why = re.sub(r"\d[\d.]*", "N", d.reason.split(":")[0].split(" for ")[0])
            drops[why] = drops.get(why, 0) + 1
    for a in agents:
        for why, count in a.declined.items():
            drops["to origin: " + why] = drops.get("to origin: " + why, 0) + count
    from_peers = sum(sum(a.bytes_by_peer.values()) for a in agents)
    busy = busy_per_chunk(sum(a.busy_answers for a in agents), from_peers, manifest.chunk_size)
    result = Result(
        case,
        origin.sent,
        times,
        failed,
        bad,
        drops=drops,
        busy_per_chunk=busy,
        lapsed=tracker.lapsed,
        cpu=cpu,
    )
    if case.corrupt:
        bad_url = agents[corrupt].url
        met = [a for a in agents if any(d.url == bad_url for d in a.dropped) or a.bytes_by_peer.get(bad_url)]
        result.corrupt_met = len(met)
        result.corrupt_dropped = sum(1 for a in met if any(d.url == bad_url for d in a.dropped))
        result.corrupt_bytes_kept = sum(a.bytes_by_peer.get(bad_url, 0) for a in agents)
    return result


def busy_per_chunk(busy: int, peer_bytes: int, chunk_size: int) -> float:
    """Asks that found a peer busy (503), per chunk fetched from peers (the real case's too)."""
    chunks = peer_bytes / chunk_size
    return busy / chunks if chunks else 0.0


def sha_of(path: Path, size: int) -> str:
    """sha256 of the first `size` bytes of `path` (a target file or device against the image)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining:
            data = f.read(min(remaining, 4 * MiB))
            if not data:
                break
            h.update(data)
            remaining -= len(data)
    return h.hexdigest()


def _run_agent(
    a: SimAgent,
    run: Run,
    origin: str,
    announcer: Callable[[str, str], Callable[[Announce], AnnounceReply]],
) -> None:
    manifest, digest, countdown = run.manifest, run.digest, run.countdown
    target = open_target(str(a.path), manifest.image_size)
    # a slowed agent would take 10 S/B: it is stopped once the measured agents are done (the
    # issue's target is about what it does to the others)
    cancel = threading.Event()
    if a.slow:
        threading.Thread(target=_set_when, args=(countdown.done, cancel), daemon=True).start()
    session: PeerSession | None = None
    waited = False
    counted = a.corrupt or a.slow  # the corrupting agent writes nothing; the slowed are not waited for
    try:
        options = WriteOptions(
            workers=WORKERS,
            write_threads=1,
            retry=RetryPolicy(retries=6, backoff=0.2, max_bad=3),
            progress_interval=5,
        )
        sources: list[ChunkSource]
        if a.peers:
            config = PeerConfig(
                host=a.host,
                serve=ServeLimits(rate=a.rate, uploads=UPLOADS),
                # the fixed floor: B/10; a peer at a tenth of the cap is caught by the relative one
                # (below a quarter of what peers served lately: agent.peer.rates)
                fetch=PeerOptions(
                    patience=PATIENCE,
                    timeout=10.0,
                    min_rate=run.full_rate / 10,
                    download=a.rate,
                    parallel=PARALLEL,
                    source_address=a.host,
                ),
            )
            mid = f"m-{a.index:012x}"
            session = PeerSession(
                manifest,
                digest,
                f"j-{a.index:012x}",
                announcer(mid, a.host),
                target.buffered_fd,
                config,
                lambda _: None,
                a.dropped.append,
            )
            if a.corrupt:
                session.server.server_close()
                liar = SilentServer if a.silent else CorruptingServer
                session.server = liar(session.swarm, target.buffered_fd, a.host, 0, config.serve)
                for chunk in manifest:  # it claims to hold every chunk: the worst case for the others
                    if chunk.kind is ChunkKind.DATA:
                        session.swarm.on_verified(chunk)
            session.__enter__()
            a.url = f"http://{a.host}:{session.server.port}"
            sources = session.sources([HttpSource(origin, PATIENT_HTTP)])
            options = session.options(options)
        else:
            sources = [CappedSource(HttpSource(origin, PATIENT_HTTP), TokenBucket(a.rate))]
        run.gate.wait()
        waited = True
        run.go.wait()  # the main process has set t0
        if session is not None:
            session.swarm.announce()  # every agent has joined: the origin shares are final
        if a.corrupt:
            countdown.done.wait(3600)  # it only serves, for as long as the others write
            return
        if a.kill_at is not None:
            timer = threading.Timer(a.kill_at, cancel.set)
            timer.daemon = True
            timer.start()
        writer = Writer(manifest, digest, sources, target, options, None, cancel)
        try:
            writer.run()
            a.seconds = time.monotonic() - run.t0.value
        except Exception as exc:
            if a.kill_at is None and not a.slow:
                a.error = f"{type(exc).__name__}: {exc}"[:300]
        if session is not None:
            a.bytes_by_peer = dict(session.source.bytes_by_peer)
            a.declined = dict(session.source.declined)
            a.busy_answers = session.source.busy_answers
            if a.kill_at is not None:
                session.close()  # killed: its server goes away with it
                session = None
            elif a.slow:
                pass  # stopped because the others are done: its session closes below
            else:  # serve on, as a deploy job does until it ends: here until every agent is done
                countdown.one_done()
                counted = True
                countdown.done.wait(3600)
    except Exception as exc:
        a.error = f"{type(exc).__name__}: {exc}"[:300]
        if not waited:
            run.gate.abort()
    finally:
        if not counted:
            countdown.one_done()
        if session is not None:
            session.close()
        target.close()


class Countdown:
    """Set once every writing agent is done (finished, failed or killed), over every worker process."""

    def __init__(self, ctx: BaseContext, n: int) -> None:
        self.left = ctx.Value("i", n)
        self.done = ctx.Event()
        if n <= 0:
            self.done.set()

    def one_done(self) -> None:
        with self.left.get_lock():
            self.left.value -= 1
            if self.left.value <= 0:
                self.done.set()


@dataclass(frozen=True)
class Run:
    """What every agent of one run shares, over every worker process: the image, the full cap, the
    start (a barrier, then `go` once the main process has set `t0`) and the countdown of writers."""

    manifest: Manifest
    digest: str
    full_rate: float  # B: a peer below a tenth of it is slow
    gate: MpBarrier
    go: MpEvent
    t0: Synchronized[float]  # time.monotonic() at the start
    countdown: Countdown


def _set_when(done: MpEvent, cancel: threading.Event) -> None:
    done.wait(3600)
    cancel.set()


def _serve_tracker(tracker: Tracker, lock: threading.Lock, conn: Connection) -> None:
    """Answer one worker's announces (machine id, its address, Announce) with (True,
    AnnounceReply), or (False, the error's text), until the worker goes."""
    while True:
        try:
            machine_id, host, message = conn.recv()
        except (EOFError, OSError):
            return
        try:
            with lock:
                reply: tuple[bool, object] = (True, tracker.announce(machine_id, host, message))
        except Exception as exc:  # the agent's announce fails with it, as a controller's 4xx would
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


class _RemoteTracker:
    """A worker's way to the tracker in the main process: one announce at a time over its pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def announcer(self, machine_id: str, host: str) -> Callable[[Announce], AnnounceReply]:
        def call(message: Announce) -> AnnounceReply:
            with self.lock:
                self.conn.send((machine_id, host, message))
                ok, reply = self.conn.recv()
            if not ok:
                raise RuntimeError(f"tracker: {reply}")
            assert isinstance(reply, AnnounceReply)
            return reply

        return call


def _worker(agents: list[SimAgent], conn: Connection, tracker_conn: Connection, run: Run) -> None:
    """One worker process: its agents, each on a thread of its own, then their results to the main
    process."""
    origin = conn.recv()
    remote = _RemoteTracker(tracker_conn)
    threads = [
        threading.Thread(
            target=_run_agent,
            args=(a, run, origin, remote.announcer),
            daemon=True,
        )
        for a in agents
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3600)
    conn.send(agents)


# -- the section -------------------------------------------------------------------------------------


def make_image(work: Path, size: int) -> tuple[Path, Manifest, str, str]:
    work.mkdir(parents=True, exist_ok=True)
    src = work / "fleet.img"
    src.write_bytes(random.Random(15).randbytes(size))
    store = WritableStore(work / "store")
    source = RawSource(str(src))
    try:
        result = import_image(store, source, ImportOptions("fleet", "1", chunk_size=MiB))
    finally:
        source.close()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    src.unlink()
    return store.root, result.manifest, result.digest, sha


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


RealCase = Callable[[Path, int], Result]  # (work dir, N) -> one run of the real namespace case


def fleet_cases(sizes: list[int], disturbed: bool, baseline_n: int) -> list[Case]:
    """The issue's cases: the two baselines at a small N, peers at every N, the disturbed ones at the
    middle N."""
    cases = (
        [
            Case("origin only", baseline_n, peers=False),
            Case("one nginx caching mirror", baseline_n, peers=False, mirror=True),
        ]
        if baseline_n
        else []  # development runs: peers only
    )
    cases += [Case("peers", n, peers=True) for n in sizes]
    if disturbed:
        n = sorted(sizes)[len(sizes) // 2]
        cases += [
            Case("peers, 5% slow", n, True, slow=0.05),
            Case("peers, 10% killed halfway", n, True, killed=0.10),
            Case("peers, one corrupting", n, True, corrupt=True),
            Case("peers, one claiming all, serving none", n, True, corrupt=True, silent=True),
        ]
    return cases


def run_fleet_bench(
    work: Path,
    sizes: list[int],
    reps: int,
    image_size: int,
    rate: float,
    egress: float,
    disturbed: bool = True,
    baseline_n: int = 10,
    baseline_reps: int = 1,
    log: Callable[[str], None] = print,
    real_case: RealCase | None = None,
    real_n: int = 10,
) -> list[str]:
    """Every case `reps` times (the baselines, whose figures are N x S and N x S / cap by design,
    `baseline_reps` times), then the table's lines. `real_case`, if given, is run `reps` times at
    `real_n` agents (the simulated case at that N too, for the comparison)."""
    store, manifest, digest, sha = make_image(work / "image", image_size)
    s = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA)
    s_over_b = s / rate
    cases = fleet_cases(sizes, disturbed, baseline_n)
    if real_case is not None and real_n not in sizes:
        cases.append(Case("peers", real_n, peers=True))
    results: dict[Case, list[Result]] = {}
    for case in cases:
        runs = reps if case.peers else baseline_reps
        for rep in range(runs):
            log(f"fleet: {case.name}, N = {case.agents}, run {rep + 1}/{runs}")
            r = run_case(work / "run", store, manifest, digest, sha, case, rate, egress)
            results.setdefault(case, []).append(r)
            _log_run(r, s, s_over_b, log)
    real: list[Result] = []
    if real_case is not None:
        for rep in range(reps):
            log(f"fleet: real namespace case, N = {real_n}, run {rep + 1}/{reps}")
            real.append(real_case(work / "real", real_n))
            _log_run(real[-1], s, s_over_b, log)
    k = sum(1 for ch in manifest if ch.kind is ChunkKind.DATA)
    return _report(results, real, s, s_over_b, rate, egress, image_size, k)


def _log_run(r: Result, s: int, s_over_b: float, log: Callable[[str], None]) -> None:
    worst = max(r.times, default=float("nan")) / s_over_b
    log(
        f"fleet:   origin {r.origin_bytes / s:.2f} S, p50 {_pct(r.times, 0.5) / s_over_b:.2f} S/B,"
        f" p99 {_pct(r.times, 0.99) / s_over_b:.2f} S/B, max {worst:.2f} S/B,"
        f" failed {len(r.failed)} {r.failed[:2]}, peers dropped {r.drops or 'none'},"
        f" claims unvouched {r.lapsed}, busy answers {r.busy_per_chunk:.1f} a chunk"
        + (f", workers' CPU {r.cpu:.0f} s" if r.cpu else "")  # (the real case's agents are not ours)
    )


def _ok(met: bool) -> str:
    return "ok" if met else "MISSED"


def _med(rs: list[Result], f: Callable[[Result], float]) -> float:
    return statistics.median(f(r) for r in rs)


@dataclass(frozen=True)
class Figures:
    """A case's medians, in S (egress) and S/B (times)."""

    egress: float
    p50: float
    p99: float
    max: float
    failed: int
    bad: int

    @classmethod
    def of(cls, rs: list[Result], s: int, s_over_b: float) -> Figures:
        return cls(
            _med(rs, lambda r: r.origin_bytes / s),
            _med(rs, lambda r: _pct(r.times, 0.5) / s_over_b),
            _med(rs, lambda r: _pct(r.times, 0.99) / s_over_b),
            _med(rs, lambda r: max(r.times, default=float("nan")) / s_over_b),
            max(len(r.failed) for r in rs),
            max(r.bad_targets for r in rs),
        )


def _target(case: Case, f: Figures, rs: list[Result], base: dict[int, Figures]) -> str:
    if case.mirror:
        return f"origin egress about 1 S: {_ok(f.egress <= 1.2)}; completion bound by the mirror's link"
    if not case.peers:
        return f"origin egress N x S = {case.agents} (the baseline)"
    ref = base.get(case.agents)
    if case.slow:
        return (
            f"others' p99 <= 1.10 x undisturbed ({ref.p99 * 1.1:.2f}): {_ok(f.p99 <= ref.p99 * 1.1)}"
            if ref
            else ""
        )
    if case.killed:
        return (
            f"survivors' p99 <= 1.3 x undisturbed ({ref.p99 * 1.3:.2f}): {_ok(f.p99 <= ref.p99 * 1.3)}"
            if ref
            else ""
        )
    if case.silent:
        stalled = max(r.drops.get("to origin: stalled", 0) for r in rs)
        ref_p99 = f" (undisturbed {ref.p99:.2f})" if ref else ""
        return (
            f"origin <= 1.2 S: {_ok(f.egress <= 1.2)}; agents that waited it out (to origin: stalled):"
            f" up to {stalled}{ref_p99}"
        )
    if case.corrupt:
        met = max(r.corrupt_met for r in rs)
        ok = all(r.corrupt_bytes_kept == 0 and r.corrupt_dropped == r.corrupt_met for r in rs) and f.bad == 0
        kept = sum(r.corrupt_bytes_kept for r in rs)
        return f"met by up to {met} agents, dropped by every one: its bytes kept {kept}: {_ok(ok)}"
    return (
        f"egress <= 1.2 {_ok(f.egress <= 1.2)}; p50 <= 1.25 {_ok(f.p50 <= 1.25)};"
        f" p99 <= 1.5 {_ok(f.p99 <= 1.5)}; max <= 2 {_ok(f.max <= 2)}"
    )


def _report(
    results: dict[Case, list[Result]],
    real: list[Result],
    s: int,
    s_over_b: float,
    rate: float,
    egress: float,
    image_size: int,
    chunks: int,
) -> list[str]:
    reps = max((len(rs) for c, rs in results.items() if c.peers), default=0)
    k = chunks
    feed = egress / rate  # the floor's c: agents the origin feeds at B at once

    def floors(n: int) -> str:
        return "/".join(f"{floor(n, q, k, feed):.2f}" for q in (0.5, 0.99, 1.0))

    lines = [
        f"image S = {s / MiB:.0f} MiB stored (k = {k} chunks of {image_size // k // MiB} MiB), per-agent cap"
        f" B = {rate / MiB:.2f} MiB/s down and up, origin (and mirror) egress cap {egress / MiB:.2f} MiB/s"
        f" (c = {feed:.0f} B); S/B = {s_over_b:.1f} s. Times in multiples of S/B. The floor for peers is"
        " p50/p99/max of the binomial pipeline (benchlib/fleetfloor.py): a chunk is served on only once"
        " whole and verified, so a piece's holders at most double per chunk time S/(kB), plus the"
        " origin's c; no store-and-forward scheme beats it with k chunks. For the origin or a mirror"
        f" alone the floor is N x S over the cap. Medians of {reps} runs"
        f" ({', '.join(sorted({f'{c.name} {len(rs)}' for c, rs in results.items() if not c.peers}))}).",
        "",
        "| case | N | origin egress / S | floor | p50 | p99 | max | failed | bad targets | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = {c.agents: Figures.of(rs, s, s_over_b) for c, rs in results.items() if c.name == "peers"}
    for case, rs in results.items():
        f = Figures.of(rs, s, s_over_b)
        ideal = floors(case.agents) if case.peers else f"{max(1.0, case.agents * rate / egress):.2f}"
        lines.append(
            f"| {case.name} | {case.agents} | {f.egress:.2f} | {ideal} | {f.p50:.2f} | {f.p99:.2f} |"
            f" {f.max:.2f} | {f.failed} | {f.bad} | {_target(case, f, rs, base)} |"
        )
    if real:
        f = Figures.of(real, s, s_over_b)
        sim = base.get(real[0].case.agents)
        agree = ""
        if sim is not None:
            worst = max(abs(f.p50 / sim.p50 - 1), abs(f.p99 / sim.p99 - 1), abs(f.egress / sim.egress - 1))
            agree = f"within 15% of the simulated case at N = {real[0].case.agents}: {_ok(worst <= 0.15)}"
        lines.append(
            f"| real namespace case | {real[0].case.agents} | {f.egress:.2f} |"
            f" {floors(real[0].case.agents)} | {f.p50:.2f} | {f.p99:.2f} | {f.max:.2f} |"
            f" {f.failed} | {f.bad} | {agree} |"
        )
    else:
        lines.append("| real namespace case | | | | | | | | | run by benchlib/fleetreal.py |")
    if base:
        worst = max(f.egress for f in base.values())
        lines.append(
            f"\nOrigin egress at every N with peers: at most {worst:.2f} S"
            f" (target <= 1.2: {_ok(worst <= 1.2)})."
        )
    if len(base) >= 2:
        lo, hi = min(base), max(base)
        ratio = base[hi].p50 / base[lo].p50
        lines.append(
            f"p50 at N = {hi} over p50 at N = {lo}: {ratio:.2f} (target <= 1.15: {_ok(ratio <= 1.15)};"
            f" the floors' ratio {floor(hi, 0.5, k, feed) / floor(lo, 0.5, k, feed):.2f})."
        )
    return lines


if __name__ == "__main__":  # development: python scripts/benchlib/fleetbench.py N [N...]
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    sizes = [int(x) for x in sys.argv[1:]] or [25]
    rate = float(os.environ.get("RATE_MIB", "0.5")) * MiB
    with tempfile.TemporaryDirectory(prefix="sledge-fleet-") as d:
        out = run_fleet_bench(
            Path(d),
            sizes,
            1,
            int(os.environ.get("SIZE_MIB", "64")) * MiB,
            rate=rate,
            egress=4 * rate,
            disturbed=os.environ.get("DISTURBED") == "1",
            baseline_n=int(os.environ.get("BASELINE_N", "10")),
        )
    print("\n".join(out))
