"""Section G's mirror case: one nginx caching mirror, configured by `sledge mirror-config`, in front
of the fleet's origin, its link capped as the origin's is.

nginx has no cap on a server's total egress (limit_rate is per request), so the mirror host's link
is a relay on 127.0.0.1 in front of nginx that passes what nginx sends through one token bucket
(agent.peer.bucket, the cap the origin and the simulated agents use too). The origin counts what
nginx fetches from it: about one copy (proxy_cache_lock makes the agents asking for a chunk at the
same time wait for one fetch), while the agents' completion is bound by the mirror's link.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

from agent.peer.bucket import TokenBucket
from benchlib.proc import BenchError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from webservers import WebServer, free_port, nginx_mirror

ROOT = Path(__file__).resolve().parents[2]


class CappedRelay:
    """TCP on 127.0.0.1 to `upstream`, the upstream's answers through one token bucket: a link."""

    def __init__(self, upstream_port: int, egress: float) -> None:
        self.upstream_port = upstream_port
        self.bucket = TokenBucket(egress, burst=256 << 10)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                down.close()
                continue
            threading.Thread(target=self._pipe, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, self.bucket), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None) -> None:
        try:
            src.settimeout(None)
            while data := src.recv(64 << 10):
                if bucket is not None and not bucket.take(len(data), self.closed):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # either side hanging up ends the connection
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


class Mirror:
    """nginx as `sledge mirror-config --store ORIGIN` configures it, behind a capped relay.
    `url` is what agents are given (the relay's /store/)."""

    def __init__(self, work: Path, origin_url: str, egress: float) -> None:
        self.work = work
        self.origin_url = origin_url
        self.egress = egress
        self.server: WebServer | None = None
        self.relay: CappedRelay | None = None
        self.url = ""

    def __enter__(self) -> Mirror:
        if subprocess.run(["sh", "-c", "command -v nginx"], capture_output=True).returncode != 0:
            raise BenchError("the fleet's mirror case needs nginx (apt-get install nginx-light)")
        self.work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        flags = ["--listen", f"127.0.0.1:{port}", "--max-size", "1G", "--cache-dir", str(self.work / "cache")]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "controller.cli",
                "mirror-config",
                "--store",
                self.origin_url + "/",
                *flags,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise BenchError(f"sledge mirror-config exited {out.returncode}: {out.stderr.strip()[-400:]}")
        self.server = nginx_mirror(self.work, port, out.stdout, connections=2048)
        self.server.__enter__()
        self.relay = CappedRelay(port, self.egress)
        self.url = f"{self.relay.url}/store"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.relay is not None:
            self.relay.close()
        if self.server is not None:
            self.server.__exit__()
