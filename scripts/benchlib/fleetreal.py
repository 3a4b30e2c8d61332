"""Section G's real case (issue 15 item 5): about 10 agents, each in a network namespace of its own
with `tc` caps on its link, writing to loop devices, against a real `sledge serve`.

Layout (all namespaces named sledge-fr*; nothing leaves them):
  sledge-fr         the hub: bridge br0 and one veth port per host (v<name>)
  sledge-fr-origin  `sledge serve` on eth0 (10.93.0.2), its egress capped (the origin cap)
  sledge-fr-a<i>    one agent process (fleetagent.py: the product's runtime, sledge.peers=1) on eth0
                    (10.93.0.<10+i>); eth0's egress capped (upload), its hub port's egress capped
                    (download: what reaches the agent leaves the bridge through that port)
Caps are tbf qdiscs at the payload rate plus TCP/IP framing (WIRE), so the bytes an agent gets per
second match the simulated case's token buckets, which count payload. The hub ports' byte counters
are sampled every 0.25 s to show each link stayed at its cap.

Per agent: completion (the job's progress event that reached the image size, from the common start
when the jobs were created), bytes from peers and served to peers (the job's `peers:` summary);
the origin's bytes from its own sledge_served_bytes_total; every loop device compared with the image.
The simulated case at the same N (fleetbench.run_case) runs in the same call, for the ratio.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import Lan

from agent.image.manifest import ChunkKind, Manifest
from benchlib.fleetbench import ANNOUNCE, WORKERS, Case, busy_per_chunk, make_image, run_case, sha_of
from benchlib.proc import BenchError

MiB = 1 << 20
PREFIX = "sledge-fr"
NET = "10.93.0"
ORIGIN_IP = f"{NET}.2"
PORT = 8480
WIRE = 1514 / 1448  # an Ethernet frame per 1448 payload bytes of a TCP segment (timestamps on)
AGENT_SCRIPT = Path(__file__).with_name("fleetagent.py")
REPO = Path(__file__).resolve().parents[2]


class FleetRealError(BenchError):
    """The real fleet could not be set up or run."""


# each agent's fetching threads: the simulated twin's. (6 were needed while a real agent's in-place
# checks bypassed the swarm's order: every chunk of a disk not known blank was fetched by the thread
# that checked it, so more threads meant more fetches at once; at N = 10 p50 2.42 S/B with 3, 1.66
# with 6. Since checked chunks join the order, 3 and 6 give 1.43 and 1.42.)
REAL_WORKERS = int(os.environ.get("REAL_WORKERS", str(WORKERS)))


def sh(*argv: str, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise FleetRealError(
            f"{' '.join(argv)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"
        )
    return p.stdout


# -- leftovers of an earlier run ------------------------------------------------------------------------


def clear_leftovers(log: Callable[[str], None]) -> None:
    """Remove an earlier run's namespaces and loop devices; refuse while one of them still runs."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    ours = [n for n in names if n == PREFIX or n.startswith(PREFIX + "-")]
    for ns in ours:
        pids = sh("ip", "netns", "pids", ns, check=False).split()
        if pids:
            raise FleetRealError(
                f"namespace {ns} of another real-fleet run still has processes {' '.join(pids)}: "
                f"expected none (end that run, or `ip netns del {ns}` after ending them)"
            )
    for ns in ours:
        log(f"fleet real: removing namespace {ns} left by an earlier run")
        sh("ip", "netns", "del", ns, check=False)
    for dev in json.loads(sh("losetup", "-J", "-l") or '{"loopdevices": []}').get("loopdevices", []):
        if "sledge-fleetreal-" in (dev.get("back-file") or ""):
            log(f"fleet real: detaching {dev['name']} ({dev['back-file']}) left by an earlier run")
            sh("losetup", "-d", dev["name"], check=False)


# -- the network ----------------------------------------------------------------------------------------


def tbf(ns: str, dev: str, rate: float) -> None:
    """Cap `dev`'s egress at `rate` payload bytes/s."""
    bits = int(rate * WIRE * 8)
    burst = max(32 << 10, int(rate * WIRE / 50))  # ~20 ms of the rate, at least a few frames
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
       "rate", f"{bits}bit", "burst", str(burst), "latency", "200ms")  # fmt: skip


# Runs inside the hub namespace (its /sys shows the hub's ports): the time and every port's
# counters, one line per sample, stamped where they are read so a busy machine cannot skew a window.
_SAMPLE = """
import os, sys, time
while True:
    t = time.monotonic()
    row = [repr(t)]
    for dev in os.listdir("/sys/class/net"):
        try:
            s = "/sys/class/net/" + dev + "/statistics/"
            tx, rx = (open(s + name).read().strip() for name in ("tx_bytes", "rx_bytes"))
            row.append(dev + "=" + tx + "," + rx)
        except OSError:
            pass
    print(" ".join(row), flush=True)
    time.sleep(float(sys.argv[1]))
"""


class Sampler:
    """The hub's port counters every `every` s, for each port's top rate over a window.

    tx on a hub port is what went towards its host (an agent's download), rx what came from it."""

    def __init__(self, lan: Lan, every: float = 0.25) -> None:
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            ["ip", "netns", "exec", lan.ns, sys.executable, "-c", _SAMPLE, str(every)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        lan.procs.append(self.proc)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            with contextlib.suppress(ValueError, IndexError):
                counters = {}
                for word in words[1:]:
                    dev, _, pair = word.partition("=")
                    tx, rx = pair.split(",")
                    counters[dev] = (int(tx), int(rx))
                self.samples.append((float(words[0]), counters))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(10)

    def top_rate(self, port: str, window: float = 2.0, rx: bool = False) -> float:
        """The most bytes/s the port moved over any `window` seconds (or more, to the next sample)."""
        k = 1 if rx else 0
        times = [t for t, _ in self.samples]
        best = 0.0
        for t, counters in self.samples:
            j = bisect.bisect_right(times, t - window) - 1  # the last sample at least `window` before
            if j < 0:
                continue
            t0, c0 = self.samples[j]
            if port in counters and port in c0:
                best = max(best, (counters[port][k] - c0[port][k]) / (t - t0))
        return best


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class RealAgent:
    index: int
    ns: str = ""
    mac: str = ""
    disk: str = ""
    backing: Path = Path()
    log: Path = Path()
    job: str = ""
    seconds: float | None = None
    started: float | None = None  # the job's first event, from the common start
    fetched_peers: int = 0
    served_peers: int = 0
    busy_answers: int = 0  # its asks that found a peer busy (the job's `peers:` summary)
    dropped: int = 0
    error: str = ""
    top_down: float = 0.0  # bytes/s on the wire, towards the agent, best 2 s
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class RealResult:
    n: int
    origin_bytes: int
    times: list[float]
    failed: list[str]
    bad_targets: int
    peer_bytes: int  # fetched from peers, all agents
    top_down: list[float]  # per agent, payload bytes/s
    origin_top: float  # bytes/s out of the origin's port, best 2 s
    agents: list[RealAgent] = field(default_factory=list)


class Origin:
    """`sledge serve` in the origin namespace; operator calls through curl inside it."""

    def __init__(self, lan: Lan, ns: str, data: Path) -> None:
        self.lan, self.ns, self.data = lan, ns, data
        self.url = f"http://{ORIGIN_IP}:{PORT}"
        data.mkdir(parents=True, exist_ok=True)
        with open(data / "serve.log", "ab") as out:
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "controller.cli", "serve",
                 "--listen", f"{ORIGIN_IP}:{PORT}", "--url", self.url, "--data", str(data),
                 "--announce-interval", str(ANNOUNCE)],  # the simulated twin's
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
            )  # fmt: skip
        lan.procs.append(proc)
        deadline = time.monotonic() + 30
        while self.call("GET", "/healthz", token=None)[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FleetRealError(
                    "sledge serve did not come up: " + (data / "serve.log").read_text()[-800:]
                )
            time.sleep(0.2)
        self.operator = (data / "operator.token").read_text().strip()

    def call(self, method: str, path: str, body: object = None, token: str | None = "") -> tuple[int, Any]:
        argv = ["ip", "netns", "exec", self.ns, "curl", "-s", "-m", "20", "-o", "-", "-w", "\n%{http_code}",
                "-X", method, self.url + path]  # fmt: skip
        token = self.operator if token == "" else token
        if token:
            argv += ["-H", f"Authorization: Bearer {token}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        raw, _, code = sh(*argv, check=False).rpartition("\n")
        try:
            return (int(code) if code.isdigit() else 0), json.loads(raw) if raw else None
        except ValueError:
            return (int(code) if code.isdigit() else 0), raw

    def served(self) -> int:
        status, text = self.call("GET", "/metrics", token=None)
        match = re.search(r"^sledge_served_bytes_total (\d+)", str(text), re.M)
        if status != 200 or not match:
            raise FleetRealError(f"origin /metrics: expected sledge_served_bytes_total, got {status}")
        return int(match.group(1))


def agent_env(linger: float, rate: float) -> dict[str, str]:
    """The agents' settings, as SLEDGE_* variables (the kernel command line's sledge.* words)."""
    return {
        "SLEDGE_PEERS": "1",
        "SLEDGE_PEER_LINGER": str(linger),
        "SLEDGE_WORKERS": str(REAL_WORKERS),
        # each simulated peer server paces its uploads with the product's own cap at B (ServeLimits);
        # tc caps the link at the same payload rate, so the two agree on who sends when
        "SLEDGE_PEER_UPLOAD_RATE": str(int(rate)),
    }


def _digest_of(path: str, size: int) -> str:
    sh("blockdev", "--flushbufs", path, check=False)
    return sha_of(Path(path), size)


def _job_figures(a: RealAgent, detail: dict[str, Any], t0: float, image_size: int) -> None:
    for e in detail.get("events", []):
        if a.started is None and e.get("seq") is not None:
            a.started = float(e["at"]) - t0
        if a.seconds is None and e.get("total") == image_size and e.get("done") == image_size:
            a.seconds = float(e["at"]) - t0
        m = re.search(r"peers: fetched (\d+) bytes from \d+ peers; served (\d+) bytes", e.get("message", ""))
        if m:
            a.fetched_peers, a.served_peers = int(m.group(1)), int(m.group(2))
        m = re.search(r"; (\d+) asks found a peer busy", e.get("message", ""))
        if m:
            a.busy_answers = int(m.group(1))
        if re.match(r"peer \S+ dropped", e.get("message", "")):
            a.dropped += 1
    if detail.get("state") != "succeeded":
        result = detail.get("result") or {}
        a.error = f"job {a.job} {detail.get('state')}: {result.get('message', detail.get('reason', ''))}"[
            :300
        ]


def run_real_case(
    work: Path,
    n: int,
    store: Path,
    manifest: Manifest,
    image_sha: str,
    rate: float,
    egress: float,
    linger: float,
    log: Callable[[str], None] = print,
) -> RealResult:
    """One deploy of the image in `store` (name fleet:1) to n agents in namespaces; everything is
    removed again on the way out, also on failure."""
    clear_leftovers(log)
    work.mkdir(parents=True, exist_ok=True)
    s_over_b = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA) / rate
    lan = Lan(address=f"{NET}.1/24", ns=PREFIX)
    agents = [RealAgent(i) for i in range(n)]
    try:
        lan.up()
        origin_ns = lan.client("origin")
        sh("ip", "-n", origin_ns, "addr", "add", f"{ORIGIN_IP}/24", "dev", "eth0")
        tbf(origin_ns, "eth0", egress)
        data = work / "controller"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        shutil.copytree(store, data / "store")
        origin = Origin(lan, origin_ns, data)
        disk_size = max(8 << 30, manifest.image_size + 16 * MiB)  # sparse; disk selection wants >= 4 GiB
        for a in agents:
            a.ns = lan.client(f"a{a.index}")
            a.mac = f"52:54:00:93:00:{a.index + 16:02x}"
            sh("ip", "-n", a.ns, "link", "set", "eth0", "address", a.mac)
            sh("ip", "-n", a.ns, "addr", "add", f"{NET}.{10 + a.index}/24", "dev", "eth0")
            tbf(a.ns, "eth0", rate)  # upload
            tbf(lan.ns, f"va{a.index}", rate)  # download
            a.backing = work / f"sledge-fleetreal-{a.index}.img"
            with open(a.backing, "wb") as f:
                f.truncate(disk_size)
            a.disk = sh("losetup", "-f", "--show", "--direct-io=on", str(a.backing)).strip()
            a.log = work / f"agent{a.index}.log"
            env = {**os.environ, **agent_env(linger, rate)}
            with open(a.log, "wb") as out:
                a.proc = subprocess.Popen(
                    ["ip", "netns", "exec", a.ns, sys.executable, str(AGENT_SCRIPT),
                     "--controller", origin.url, "--disk", a.disk, "--uuid", str(uuid.uuid4()),
                     "--name", f"fleet-a{a.index}", "--state-dir", str(work / f"state{a.index}")],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env,
                )  # fmt: skip
            lan.procs.append(a.proc)
        _wait_registered(origin, agents, log)
        before = origin.served()
        with Sampler(lan) as sampler:
            t0 = time.time()
            _create_jobs(origin, agents)
            _wait_jobs(origin, agents, timeout=10 * s_over_b + 120)
            # the agents linger, serving, then report their peers summary and exit (one job each)
            for a in agents:
                assert a.proc is not None
                try:
                    a.proc.wait(linger + 60)
                except subprocess.TimeoutExpired:
                    a.error = a.error or f"agent {a.index} still running {linger + 60:.0f} s after its job"
        origin_bytes = origin.served() - before
        bad = 0
        for a in agents:
            status, detail = origin.call("GET", f"/v1/jobs/{a.job}")
            if status != 200:
                a.error = a.error or f"job {a.job}: GET answered {status}"
                continue
            _job_figures(a, detail, t0, manifest.image_size)
            a.top_down = sampler.top_rate(f"va{a.index}") / WIRE
            if not a.error and _digest_of(a.disk, manifest.image_size) != image_sha:
                bad += 1
                a.error = f"{a.disk}: its first {manifest.image_size} bytes are not the image's"
        return RealResult(
            n,
            origin_bytes,
            [a.seconds for a in agents if a.seconds is not None and not a.error],
            [f"agent {a.index}: {a.error}" for a in agents if a.error],
            bad,
            sum(a.fetched_peers for a in agents),
            [a.top_down for a in agents],
            sampler.top_rate("vorigin", rx=True) / WIRE,
            agents,
        )
    finally:
        lan.down()
        for a in agents:
            if a.disk:
                sh("losetup", "-d", a.disk, check=False)
            if a.backing != Path():
                a.backing.unlink(missing_ok=True)


def _wait_registered(origin: Origin, agents: list[RealAgent], log: Callable[[str], None]) -> None:
    deadline = time.monotonic() + 60
    macs = {a.mac for a in agents}
    while True:
        _, body = origin.call("GET", "/v1/machines")
        items = body.get("machines") or body.get("items") or [] if isinstance(body, dict) else []
        ready = {mac for m in items if m.get("state") != "discovered" for mac in m.get("macs", [])} & macs
        if len(ready) == len(macs):
            return
        for a in agents:
            if a.proc is not None and a.proc.poll() is not None:
                raise FleetRealError(
                    f"agent {a.index} exited {a.proc.returncode}: {a.log.read_text()[-600:]}"
                )
        if time.monotonic() > deadline:
            raise FleetRealError(f"agents registered: expected {len(macs)}, got {len(ready)} in 60 s")
        time.sleep(0.3)


def _create_jobs(origin: Origin, agents: list[RealAgent]) -> None:
    """One deploy job per agent, created together (each curl is a process of its own)."""

    def create(a: RealAgent) -> None:
        status, body = origin.call(
            "POST", "/v1/jobs", {"machine": a.mac, "kind": "deploy", "image": "fleet:1"}
        )
        if status != 201:
            a.error = f"job for {a.mac}: expected 201, got {status} {body}"[:300]
        else:
            a.job = str(body["id"])

    threads = [threading.Thread(target=create, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [a.error for a in agents if not a.job]
    if missing:
        raise FleetRealError("; ".join(missing))


def _wait_jobs(origin: Origin, agents: list[RealAgent], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    left = {a.job for a in agents}
    while left:
        for job in list(left):
            status, body = origin.call("GET", f"/v1/jobs/{job}")
            if status == 200 and body.get("state") in ("succeeded", "failed", "cancelled"):
                left.discard(job)
        if time.monotonic() > deadline:
            raise FleetRealError(f"jobs still running after {timeout:.0f} s: {sorted(left)}")
        time.sleep(0.5)


# -- the section's rows -----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_real_bench(
    work: Path,
    n: int,
    reps: int,
    image_size: int,
    rate: float,
    egress: float,
    log: Callable[[str], None] = print,
) -> list[str]:
    """The real case and the simulated one at the same N, `reps` runs each; the table's lines."""
    store, manifest, digest, sha = make_image(work / "image", image_size)
    s = sum(c.stored_len for c in manifest if c.kind is ChunkKind.DATA)
    s_over_b = s / rate
    linger = (
        s_over_b / 2
    )  # finished agents serve on a while, as every simulated one serves until all are done
    sims, reals = [], []
    for rep in range(reps):
        log(f"fleet real: simulated peers, N = {n}, run {rep + 1}/{reps}")
        sims.append(
            run_case(work / "sim", store, manifest, digest, sha, Case("peers", n, True), rate, egress)
        )
        log(f"fleet real: namespaces, N = {n}, run {rep + 1}/{reps}")
        r = run_real_case(work / "real", n, store, manifest, sha, rate, egress, linger, log)
        reals.append(r)
        log(
            f"fleet real:   origin {r.origin_bytes / s:.2f} S, p50 {_pct(r.times, 0.5) / s_over_b:.2f} S/B,"
            f" max {max(r.times, default=float('nan')) / s_over_b:.2f} S/B,"
            f" from peers {r.peer_bytes / s:.2f} S,"
            f" failed {len(r.failed)} {r.failed[:2]}, top download {max(r.top_down, default=0) / rate:.2f} B"
        )
        # each agent, slowest last: where the p99 comes from (its start, what peers gave it)
        done = sorted(r.agents, key=lambda a: a.seconds if a.seconds is not None else float("inf"))
        log(
            "fleet real:   agents, slowest last (done S/B, first event s, from peers / served MiB, busy):"
            + "".join(
                f" a{a.index} {(a.seconds or float('nan')) / s_over_b:.2f} {a.started or float('nan'):.1f}"
                f" {a.fetched_peers / MiB:.0f}/{a.served_peers / MiB:.0f} {a.busy_answers};"
                for a in done
            )
        )

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    rows = [
        ("origin egress / S", med([r.origin_bytes / s for r in sims]),
         med([r.origin_bytes / s for r in reals])),
        ("p50 / (S/B)", med([_pct(r.times, 0.5) / s_over_b for r in sims]),
         med([_pct(r.times, 0.5) / s_over_b for r in reals])),
        ("p99 / (S/B)", med([_pct(r.times, 0.99) / s_over_b for r in sims]),
         med([_pct(r.times, 0.99) / s_over_b for r in reals])),
        ("max / (S/B)", med([max(r.times, default=float("nan")) / s_over_b for r in sims]),
         med([max(r.times, default=float("nan")) / s_over_b for r in reals])),
    ]  # fmt: skip
    lines = [
        "",
        f"Real case: N = {n} agents (fleetagent.py: the product's runtime, sledge.peers=1, peer linger"
        f" {linger:.0f} s) each in its own network namespace, tc tbf caps B = {rate / MiB:.2f} MiB/s down and"
        f" up on its link, origin `sledge serve` egress capped at {egress / MiB:.2f} MiB/s, loop devices;"
        f" against the simulated case at the same N; medians of {reps}:",
        "",
        "| figure | simulated | real (namespaces) | real / simulated | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, sim, real in rows:
        ratio = real / sim if sim else float("nan")
        ok = "ok" if abs(ratio - 1) <= 0.15 else "MISSED"
        lines.append(f"| {name} | {sim:.2f} | {real:.2f} | {ratio:.2f} | within 15%: {ok} |")
    failed = max(len(r.failed) for r in reals)
    bad = max(r.bad_targets for r in reals)
    top = max((max(r.top_down, default=0.0) for r in reals), default=0.0)
    lines.append(
        f"\nReal case: failed agents {failed}, bad targets {bad} (every loop device compared with the image),"
        f" bytes from peers {med([r.peer_bytes / s for r in reals]):.2f} S,"
        f" top 2-s download rate of any agent {top / rate:.2f} B,"
        f" origin's top 2-s egress {max(r.origin_top for r in reals) / egress:.2f} x its cap."
    )
    busy_sim = med([r.busy_per_chunk for r in sims])
    chunk_size = manifest.chunk_size
    busy_real = med(
        [busy_per_chunk(sum(a.busy_answers for a in r.agents), r.peer_bytes, chunk_size) for r in reals]
    )
    lines.append(
        f"Asks that found a peer busy (503), per chunk fetched from peers: simulated {busy_sim:.1f},"
        f" real {busy_real:.1f}"
        " (a real one costs a round trip through two capped links' queues, a simulated one next to nothing)."
    )
    return lines


if __name__ == "__main__":  # development: cd scripts && ../.venv/bin/python -m benchlib.fleetreal [N]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sledge-fleetreal-", dir="/var/tmp") as d:
        out = run_real_bench(
            Path(d),
            int(sys.argv[1]) if len(sys.argv) > 1 else 10,
            int(os.environ.get("REPS", "1")),
            int(os.environ.get("SIZE_MIB", "64")) * MiB,
            rate=MiB // 2,
            egress=2 * MiB,
        )
    print("\n".join(out))
