"""TLS with a pinned CA: `sledge serve --tls-cert/--tls-key`, an agent that trusts only that CA
registers and deploys over https; one pinned to another CA refuses the controller."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent import protocol as p
from agent.runtime.transport import HttpTransport, TransportError
from tests.images import MiB, half_sparse_image
from tests.integration.test_agent_runtime import GatedMachine, import_into
from tests.integration.test_controller_serve import MAC, free_port
from tests.tools import need
from tests.unit.test_controller_kit import inventory


def make_ca(d: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name} CA",
        "-keyout",
        f"{name}-ca.key",
        "-out",
        f"{name}-ca.pem",
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{name}-ca.pem",
        "-CAkey",
        f"{name}-ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        f"{name}.pem",
    )
    return d / f"{name}-ca.pem", d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture
def tls_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    need("openssl")
    ca, cert, key = make_ca(tmp_path, "sledge")
    port = free_port()
    data = tmp_path / "data"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data",
            str(data),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
    yield f"https://127.0.0.1:{port}", ca, data, context
    proc.terminate()
    proc.wait(10)


def test_agent_pinned_to_the_controllers_ca_registers_and_deploys(tls_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from agent.runtime.backoff import Backoff
    from agent.runtime.config import AgentConfig
    from agent.runtime.devices import BlockDisks, HttpSources
    from agent.runtime.loop import Agent

    url, ca, data, context = tls_server
    src = half_sparse_image(tmp_path / "img", 6 * MiB, stripe=MiB)

    class _Srv:  # import_into wants .data
        pass

    srv = _Srv()
    srv.data = data  # type: ignore[attr-defined]
    import_into(srv, src, "demo", "1")  # type: ignore[arg-type]
    target = tmp_path / "disk.img"
    config = AgentConfig(
        controller=url,
        ca=str(ca),
        mac=MAC,
        state_dir=str(tmp_path / "st"),
        heartbeat=0.3,
        poll_wait=1.0,
        workers=2,
    )
    agent = Agent(
        config,
        HttpTransport(url, str(ca)),
        GatedMachine(target),
        lambda s: None,
        backoff=Backoff(0.05, 0.5),
        sources=HttpSources(str(ca)),
        disks=BlockDisks(),
    )
    thread = threading.Thread(target=agent.run, args=(1,), daemon=True)
    thread.start()
    token = (data / "operator.token").read_text().strip()

    def call(method: str, path: str, body: object = None) -> dict:  # type: ignore[type-arg]
        req = urllib.request.Request(
            url + path, method=method, data=json.dumps(body).encode() if body else None
        )
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, context=context, timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    deadline = time.monotonic() + 30
    while not agent.machine_id:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job = call("POST", "/v1/jobs", {"machine": MAC, "kind": "deploy", "image": "demo:1"})
    thread.join(60)
    assert call("GET", f"/v1/jobs/{job['id']}")["state"] == "succeeded"
    assert target.read_bytes()[: 6 * MiB] == src.read_bytes()


def test_agent_pinned_to_another_ca_refuses_the_controller(tls_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, _, _, _ = tls_server
    other_ca, _, _ = make_ca(tmp_path, "other")
    transport = HttpTransport(url, str(other_ca))
    with pytest.raises(TransportError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        transport.register(p.RegisterRequest("t", inventory(macs=(MAC,))))
