"""Section G (issue 15): a simulated fleet deploying one image at once, in this one process.

Every agent runs the product's own code: the writer's pipeline (fetch, verify, write) into a
sparse file of its own, its PeerSession (peer server, peer source, swarm order, announces), and
the controller's Tracker (called in-process, one call at a time, as one controller answers).
Each agent has its own download cap and upload cap (token buckets in its sources and its peer
server), the origin's egress is capped by a token bucket too, and the origin counts what it sends.
Cases: origin only, peers, peers with 5% of agents slowed to a tenth of the cap, peers with 10% of
agents killed halfway, peers with one agent serving corrupted bytes. Printed as multiples of S/B
(S = image stored bytes, B = per-agent cap) beside the issue's targets.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
from controller.fleet.tracker import Tracker, TrackerPolicy
from controller.images.importer import ImportOptions, import_image
from controller.images.sources import RawSource
from controller.images.store import WritableStore

MiB = 1 << 20
# an origin shared by a whole fleet is slow per request by design: not a stall
PATIENT_HTTP = Timeouts(connect=10.0, stall=60.0, min_rate=4 << 10)
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
    kill_at: float | None = None  # seconds after the start
    seconds: float | None = None
    error: str = ""
    dropped: list[PeerDropped] = field(default_factory=list)
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    url: str = ""
    declined: dict[str, int] = field(default_factory=dict)


def _announcer(
    tracker: Tracker, lock: threading.Lock, machine_id: str
) -> Callable[[Announce], AnnounceReply]:
    def call(message: Announce) -> AnnounceReply:
        with lock:
            return tracker.announce(machine_id, "127.0.0.1", message)

    return call


@dataclass(frozen=True)
class Case:
    name: str
    agents: int
    peers: bool
    slow: float = 0.0  # share of agents at a tenth of the cap
    killed: float = 0.0  # share of agents killed halfway
    corrupt: bool = False


@dataclass
class Result:
    case: Case
    origin_bytes: int
    times: list[float]  # seconds to complete, agents that were not killed
    failed: list[str]
    bad_targets: int
    corrupt_met: int = 0  # agents that asked the corrupting peer
    corrupt_dropped: int = 0  # ... and dropped it
    corrupt_bytes_kept: int = 0  # bytes from it that any writer took (must be 0)
    drops: dict[str, int] = field(default_factory=dict)  # why agents dropped peers, counted


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
            kill_at=s_over_b / 2 if i in killed else None,
        )
        for i in range(n)
    ]
    tracker = Tracker(TrackerPolicy(interval=0.25, ttl=5.0))
    lock = threading.Lock()
    origin = Origin(store, egress)
    start_gate = threading.Barrier(n + 1)
    go = threading.Event()
    countdown = Countdown(sum(1 for a in agents if not a.corrupt))
    t0 = [0.0]
    threads = []
    for a in agents:
        threads.append(
            threading.Thread(
                target=_run_agent,
                args=(a, manifest, digest, origin.url, tracker, lock, start_gate, go, countdown, t0, rate),
                daemon=True,
            )
        )
    for t in threads:
        t.start()
    start_gate.wait()  # every agent has its session up and has announced once
    t0[0] = time.monotonic()
    go.set()
    for t in threads:
        t.join(3600)
    origin.close()
    # the others' times: not the killed, the corrupting, nor the slowed agents (the issue's targets
    # are about what a few bad agents do to everyone else)
    times = [
        a.seconds
        for a in agents
        if a.kill_at is None and a.seconds is not None and not a.corrupt and a.index not in slow
    ]
    failed = [f"agent {a.index}: {a.error}" for a in agents if a.error and a.kill_at is None]
    bad = 0
    for a in agents:
        if (
            a.kill_at is None
            and not a.corrupt
            and not a.error
            and _sha(a.path, manifest.image_size) != image_sha
        ):
            bad += 1
        a.path.unlink(missing_ok=True)
    drops: dict[str, int] = {}
    for a in agents:
        for d in a.dropped:
            why = d.reason.split(":")[0].split(" for ")[0]
            drops[why] = drops.get(why, 0) + 1
    for a in agents:
        for why, count in a.declined.items():
            drops["to origin: " + why] = drops.get("to origin: " + why, 0) + count
    result = Result(case, origin.sent, times, failed, bad, drops=drops)
    if case.corrupt:
        bad_url = agents[corrupt].url
        met = [a for a in agents if any(d.url == bad_url for d in a.dropped) or a.bytes_by_peer.get(bad_url)]
        result.corrupt_met = len(met)
        result.corrupt_dropped = sum(1 for a in met if any(d.url == bad_url for d in a.dropped))
        result.corrupt_bytes_kept = sum(a.bytes_by_peer.get(bad_url, 0) for a in agents)
    return result


def _sha(path: Path, size: int) -> str:
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
    manifest: Manifest,
    digest: str,
    origin: str,
    tracker: Tracker,
    lock: threading.Lock,
    gate: threading.Barrier,
    go: threading.Event,
    countdown: Countdown,
    t0: list[float],
    full_rate: float,
) -> None:
    target = open_target(str(a.path), manifest.image_size)
    cancel = threading.Event()
    session: PeerSession | None = None
    waited = False
    counted = a.corrupt  # the corrupting agent writes nothing
    try:
        options = WriteOptions(
            workers=6,
            write_threads=1,
            retry=RetryPolicy(retries=6, backoff=0.2, max_bad=3),
            progress_interval=5,
        )
        sources: list[ChunkSource]
        if a.peers:
            config = PeerConfig(
                host="127.0.0.1",
                serve=ServeLimits(uploads=4, rate=a.rate),
                # a peer at a tenth of the cap, its upload shared by 4, sends ~B/40: slower than B/10 is slow
                fetch=PeerOptions(patience=20.0, timeout=10.0, min_rate=full_rate / 10, download=a.rate),
            )
            mid = f"m-{a.index:012x}"
            session = PeerSession(
                manifest,
                digest,
                f"j-{a.index:012x}",
                _announcer(tracker, lock, mid),
                target.buffered_fd,
                config,
                lambda _: None,
                a.dropped.append,
            )
            if a.corrupt:
                session.server.server_close()
                session.server = CorruptingServer(
                    session.swarm, target.buffered_fd, "127.0.0.1", 0, config.serve
                )
                for chunk in manifest:  # it claims to hold every chunk: the worst case for the others
                    if chunk.kind is ChunkKind.DATA:
                        session.swarm.on_verified(chunk)
            session.__enter__()
            a.url = f"http://127.0.0.1:{session.server.port}"
            sources = session.sources([HttpSource(origin, PATIENT_HTTP)])
            options = session.options(options)
        else:
            sources = [CappedSource(HttpSource(origin, PATIENT_HTTP), TokenBucket(a.rate))]
        gate.wait()
        waited = True
        go.wait()  # the main thread has set t0
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
            a.seconds = time.monotonic() - t0[0]
        except Exception as exc:
            if a.kill_at is None:
                a.error = f"{type(exc).__name__}: {exc}"[:300]
        if session is not None:
            a.bytes_by_peer = dict(session.source.bytes_by_peer)
            a.declined = dict(session.source.declined)
            if a.kill_at is not None:
                session.close()  # killed: its server goes away with it
                session = None
            else:  # serve on, as a deploy job does until it ends: here until every agent is done
                countdown.one_done()
                counted = True
                countdown.done.wait(3600)
    except Exception as exc:
        a.error = f"{type(exc).__name__}: {exc}"[:300]
        if not waited:
            gate.abort()
    finally:
        if not counted:
            countdown.one_done()
        if session is not None:
            session.close()
        target.close()


class Countdown:
    """Set once every writing agent is done (finished, failed or killed)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.lock = threading.Lock()
        self.done = threading.Event()
        if n <= 0:
            self.done.set()

    def one_done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left <= 0:
                self.done.set()


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


def run_fleet_bench(
    work: Path,
    sizes: list[int],
    reps: int,
    image_size: int,
    rate: float,
    egress: float,
    disturbed: bool = True,
    origin_only_max: int = 25,
    log: Callable[[str], None] = print,
) -> list[str]:
    store, manifest, digest, sha = make_image(work / "image", image_size)
    s = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA)
    s_over_b = s / rate
    cases: list[Case] = []
    for n in sizes:
        if n <= origin_only_max:
            cases.append(Case("origin only", n, peers=False))
        cases.append(Case("peers", n, peers=True))
    if disturbed:
        n = sizes[-1] if len(sizes) == 1 else sorted(sizes)[len(sizes) // 2]
        cases += [
            Case("peers, 5% slow", n, True, slow=0.05),
            Case("peers, 10% killed halfway", n, True, killed=0.10),
            Case("peers, one corrupting", n, True, corrupt=True),
        ]
    results: dict[Case, list[Result]] = {}
    for case in cases:
        for rep in range(reps):
            log(f"fleet: {case.name}, N = {case.agents}, run {rep + 1}/{reps}")
            r = run_case(work / "run", store, manifest, digest, sha, case, rate, egress)
            results.setdefault(case, []).append(r)
            log(
                f"fleet:   origin {r.origin_bytes / s:.2f} S, p50 {_pct(r.times, 0.5) / s_over_b:.2f} S/B,"
                f" max {max(r.times, default=float('nan')) / s_over_b:.2f} S/B, failed {len(r.failed)},"
                f" peers dropped {r.drops or 'none'}"
            )
    return _report(results, s, s_over_b, rate, egress, image_size)


def _ok(met: bool) -> str:
    return "ok" if met else "MISSED"


def _med(rs: list[Result], f: Callable[[Result], float]) -> float:
    return statistics.median(f(r) for r in rs)


def _report(
    results: dict[Case, list[Result]], s: int, s_over_b: float, rate: float, egress: float, image_size: int
) -> list[str]:
    lines = [
        f"image S = {s / MiB:.0f} MiB stored ({image_size // MiB} chunks of 1 MiB), per-agent cap B = "
        f"{rate / MiB:.2f} MiB/s down and up, origin egress cap {egress / MiB:.2f} MiB/s;"
        f" ideal S/B = {s_over_b:.1f} s;",
        f"medians of {len(next(iter(results.values())))} run(s); times in multiples of S/B (ideal 1.00).",
        "",
        "| case | N | origin egress / S | p50 | p99 | max | failed | bad targets | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base: dict[int, float] = {}
    for case, rs in results.items():
        eg = _med(rs, lambda r: r.origin_bytes / s)
        p50 = _med(rs, lambda r: _pct(r.times, 0.5) / s_over_b)
        p99 = _med(rs, lambda r: _pct(r.times, 0.99) / s_over_b)
        mx = _med(rs, lambda r: max(r.times, default=float("nan")) / s_over_b)
        failed = max(len(r.failed) for r in rs)
        bad = max(r.bad_targets for r in rs)
        if case.peers and case.name == "peers":
            base[case.agents] = p99
            target = (
                f"egress <= 1.2 {_ok(eg <= 1.2)}; p50 <= 1.25 {_ok(p50 <= 1.25)};"
                f" p99 <= 1.5 {'ok' if p99 <= 1.5 else 'MISSED'}; max <= 2 {'ok' if mx <= 2 else 'MISSED'}"
            )
        elif case.slow:
            ref = base.get(case.agents)
            target = f"p99 <= 1.10 x undisturbed ({ref * 1.1:.2f})" if ref else ""
            if ref:
                target += " ok" if p99 <= ref * 1.1 else " MISSED"
        elif case.killed:
            ref = base.get(case.agents)
            target = f"survivors' p99 <= 1.3 x undisturbed ({ref * 1.3:.2f})" if ref else ""
            if ref:
                target += " ok" if p99 <= ref * 1.3 else " MISSED"
        elif case.corrupt:
            r = rs[-1]
            ok = r.corrupt_bytes_kept == 0 and r.corrupt_dropped == r.corrupt_met and bad == 0
            target = (
                f"met by {r.corrupt_met}, dropped by {r.corrupt_dropped},"
                f" its bytes kept: {r.corrupt_bytes_kept} {_ok(ok)}"
            )
        else:
            target = f"expected N x S = {case.agents}"
        lines.append(
            f"| {case.name} | {case.agents} | {eg:.2f} | {p50:.2f} | {p99:.2f} | {mx:.2f} | {failed} | {bad}"
            f" | {target} |"
        )
    peers_n = sorted(base)
    if len(peers_n) >= 2:
        p50s = {
            c.agents: _med(rs, lambda r: _pct(r.times, 0.5) / s_over_b)
            for c, rs in results.items()
            if c.name == "peers"
        }
        lo, hi = peers_n[0], peers_n[-1]
        ratio = p50s[hi] / p50s[lo]
        lines.append(
            f"\np50 at N = {hi} over p50 at N = {lo}: {ratio:.2f} (target <= 1.15: {_ok(ratio <= 1.15)})"
        )
    return lines


if __name__ == "__main__":  # development: python scripts/benchlib/fleetbench.py N [N...]
    import sys
    import tempfile

    sizes = [int(x) for x in sys.argv[1:]] or [25]
    with tempfile.TemporaryDirectory(prefix="sledge-fleet-") as d:
        out = run_fleet_bench(
            Path(d),
            sizes,
            1,
            int(os.environ.get("SIZE_MIB", "16")) * MiB,
            rate=MiB // 2,
            egress=2 * MiB,
            disturbed=os.environ.get("DISTURBED") == "1",
            origin_only_max=int(os.environ.get("ORIGIN_MAX", "25")),
        )
    print("\n".join(out))
