"""The servers and devices a run sets up, each torn down on exit: nginx on 127.0.0.1, a loop device."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from benchlib.proc import BenchError, log, run
from benchlib.system import free_port

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
user root root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class Nginx:
    """A private nginx serving `root` read-only on 127.0.0.1:PORT (a free port)."""

    def __init__(self, root: Path, confdir: Path) -> None:
        self.root = root
        self.dir = confdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Nginx:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port, root=self.root))
        argv = ["nginx", "-p", f"{self.dir}/", "-e", str(self.dir / "error.log"), "-c", str(conf)]
        # Its own session, so a Ctrl-C reaches only us and we stop nginx in order (not via kill_all).
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        log(f"nginx serving {self.root} at {self.base} (pid {self.proc.pid})")
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"nginx exited {self.proc.returncode}: {self._errors()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("HEAD", "/")
                c.getresponse()
                c.close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"nginx did not answer on port {self.port}: {self._errors()}")

    def _errors(self) -> str:
        log_file = self.dir / "error.log"
        return log_file.read_text()[-500:] if log_file.exists() else ""

    def __exit__(self, *exc: object) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its own process group (start_new_session)
            p.wait()
        log("nginx stopped")


class LoopDevice:
    """`losetup -f --show --direct-io=on` on a sparse backing file; `losetup -d` on exit."""

    def __init__(self, backing: Path, size: int) -> None:
        self.backing = backing
        self.size = size
        self.device = ""

    def __enter__(self) -> LoopDevice:
        with open(self.backing, "wb") as f:
            f.truncate(self.size)
        self.device = run(["losetup", "-f", "--show", "--direct-io=on", str(self.backing)]).strip()
        dio = Path(f"/sys/block/{Path(self.device).name}/loop/dio")
        if dio.exists() and dio.read_text().strip() != "1":
            log(f"warning: {self.device} is not in direct-I/O mode")
        log(f"loop device {self.device} on {self.backing}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False)
            log(f"loop device {self.device} detached")
            self.device = ""


class StalledServer:
    """A dead mirror: accepts every connection on 127.0.0.1 and never answers (the case in issue 15,
    where each chunk waited out the stall timeout before failing over)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="stalled-server", daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            self._held.append(conn)  # read nothing, answer nothing, until the bench ends

    def __enter__(self) -> StalledServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._held:
            conn.close()
        self.sock.close()
