"""A real S3 API on 127.0.0.1: moto's server mode (PyPI `moto[server]`) as a child process.

Credentials are fake and given through the environment only, so nothing is read from the
developer's ~/.aws and no request leaves the machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "sledge-test",
    "AWS_SECRET_ACCESS_KEY": "sledge-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/sledge-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sledge-test-aws-credentials",
}


def without_aws(env: dict[str, str]) -> dict[str, str]:
    """`env` with every AWS credential source taken away (what an agent has)."""
    out = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    out["AWS_EC2_METADATA_DISABLED"] = "true"
    return out


class MotoServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "moto.log"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**os.environ, **FAKE_ENV},
                start_new_session=True,
            )
        deadline = time.monotonic() + 60  # a loaded CI machine starts Python slowly
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited {self.proc.returncode}: {log.read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"moto server did not answer on {self.url}: {log.read_text()[-500:]}")

    def __exit__(self, *exc: object) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
