"""`sledge serve` as a real process on a real SQLite file: kill -9 mid-job and restart, lease
expiry, and the operator CLI against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import HEARTBEAT_PATH, NEXT_JOB_PATH, REGISTER_PATH, job_events_path, job_finish_path
from controller.cli import main
from tests.unit.test_controller_kit import add_image, event, inventory

MAC = "52:54:00:aa:bb:01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    data: Path
    port: int
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "controller.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data",
            str(self.data),
            *self.extra,
        ]
        log = open(self.data.parent / "serve.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, (self.data.parent / "serve.log").read_text()
                time.sleep(0.05)
        raise AssertionError("sledge serve did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def operator(self) -> str:
        return (self.data / "operator.token").read_text().strip()

    def call(self, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                raw = r.read()
                return r.status, (
                    json.loads(raw)
                    if raw and r.headers["Content-Type"].startswith("application/json")
                    else raw
                )
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def enroll(self) -> tuple[str, str]:
        status, script = self.call("GET", f"/boot/ipxe?mac={MAC}")
        token = script.decode().split("sledge.token=")[1].split()[0]
        status, reply = self.call(
            "POST",
            REGISTER_PATH,
            {"enrollment_token": token, "inventory": inventory(macs=(MAC,)).to_wire()},
        )
        assert status == 200, reply
        return reply["machine_id"], reply["agent_token"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", free_port())
    yield s
    s.stop()


def sledge(capsys: pytest.CaptureFixture[str], server: Server, *args: str) -> tuple[int, str, str]:
    rc = main([*args, "--controller", server.url, "--data", str(server.data)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_what_agents_say_reaches_the_operator_s_terminal_without_its_control_characters(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event's text is an agent's (and a drop's reason quotes a peer's status line): ESC, BEL
    and CR in it would clear the operator's screen, set its title, or overwrite a line."""
    server.start()
    add_image(server.data / "store", "tiny", "1")
    _, agent = server.enroll()
    rc, out, err = sledge(capsys, server, "deploy", MAC, "tiny:1", "--json")
    job_id = json.loads(out)["id"]
    assert server.call("GET", f"{NEXT_JOB_PATH}?wait=0", token=agent)[0] == 200
    hostile = "peer dropped: \x1b[2J\x1b]0;owned\x07\x9b31m deploy succeeded\rOK"
    posted = {"attempt": 1, "events": [{**event(1), "kind": "warning", "message": hostile}]}
    assert server.call("POST", job_events_path(job_id), posted, agent)[0] == 200
    rc, out, err = sledge(capsys, server, "events", job_id)
    assert rc == 0, err
    assert "\\x1b[2J\\x1b]0;owned\\x07\\x9b31m deploy succeeded\\x0dOK" in out, out
    assert not any(c in out for c in "\x1b\x07\x9b\r")
    rc, out, _ = sledge(capsys, server, "events", job_id, "--json")
    assert json.loads(out)[-1]["message"] == hostile, "--json keeps the text as it was"


def test_kill_9_mid_deploy_loses_and_doubles_nothing(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.start()
    assert os.stat(server.data / "operator.token").st_mode & 0o777 == 0o600
    add_image(server.data / "store", "tiny", "1")
    machine_id, agent = server.enroll()
    rc, out, err = sledge(capsys, server, "deploy", MAC, "tiny:1", "--json")
    assert rc == 0, err
    job_id = json.loads(out)["id"]
    status, assignment = server.call("GET", f"{NEXT_JOB_PATH}?wait=0", token=agent)
    assert status == 200 and assignment["job_id"] == job_id and assignment["next_seq"] == 1
    events_url = job_events_path(job_id)
    status, ack = server.call(
        "POST", events_url, {"attempt": 1, "events": [event(s, done=s, total=8) for s in range(1, 6)]}, agent
    )
    assert (status, ack) == (200, {"next_seq": 6})

    server.kill9()
    server.start()

    # the agent never got an answer for its last post (as if cut off), so it sends 4-8
    status, ack = server.call(
        "POST", events_url, {"attempt": 1, "events": [event(s, done=s, total=8) for s in range(4, 9)]}, agent
    )
    assert (status, ack) == (200, {"next_seq": 9})
    status, beat = server.call("POST", HEARTBEAT_PATH, {"job_id": job_id}, agent)
    assert (status, beat) == (200, {"cancel": []})
    finish = {"attempt": 1, "result": {"outcome": "succeeded", "bytes_written": 4200}}
    assert server.call("POST", job_finish_path(job_id), finish, agent)[0] == 200

    status, job = server.call("GET", f"/v1/jobs/{job_id}", token=server.operator)
    assert job["state"] == "succeeded" and job["attempts"] == 1 and (job["done"], job["total"]) == (8, 8)
    assert [e["seq"] for e in job["events"] if e["source"] == "agent"] == list(range(1, 9))
    status, script = server.call("GET", f"/boot/ipxe?mac={MAC}")
    assert script.decode().endswith("\nexit 1\n")

    rc, out, _ = sledge(capsys, server, "machines")
    assert rc == 0 and machine_id in out and "deployed" in out and "tiny:1" in out
    rc, out, _ = sledge(capsys, server, "jobs", "--json")
    assert rc == 0 and [j["id"] for j in json.loads(out)] == [job_id]
    rc, out, _ = sledge(capsys, server, "events", job_id)
    assert rc == 0 and out.count(f"{job_id}") == len(job["events"])
    rc, out, _ = sledge(capsys, server, "machine", "show", "node1")
    assert rc == 0 and f"machine   {machine_id}  (deployed)" in out
    rc, out, _ = sledge(capsys, server, "images")
    assert rc == 0 and "tiny" in out
    rc, out, err = sledge(capsys, server, "deploy", "nosuch", "tiny:1")
    assert (
        rc == 1
        and out == ""
        and err == "sledge: machine 'nosuch': no machine with that id, MAC or hostname\n"
    )


def test_lease_expiry_requeues_with_the_reason_and_wait_follows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = Server(tmp_path / "data", free_port(), ("--lease", "0.5", "--reap-interval", "0.1"))
    try:
        server.start()
        machine_id, agent = server.enroll()
        status, job = server.call(
            "POST", "/v1/jobs", {"machine": machine_id, "kind": "erase"}, server.operator
        )
        assert status == 201, job
        assert server.call("GET", f"{NEXT_JOB_PATH}?wait=0", token=agent)[0] == 200
        time.sleep(1.0)  # the agent goes silent
        _status, shown = server.call("GET", f"/v1/jobs/{job['id']}", token=server.operator)
        assert (
            shown["state"] == "queued"
            and "no heartbeat from the agent) in attempt 1; re-queued" in shown["reason"]
        )

        def agent_runs_it() -> None:
            time.sleep(0.3)
            _, again = server.call("GET", f"{NEXT_JOB_PATH}?wait=0", token=agent)
            url = job_events_path(job["id"])
            server.call("POST", url, {"attempt": 2, "events": [event(1, "zeroing", done=5, total=10)]}, agent)
            server.call(
                "POST",
                job_finish_path(job["id"]),
                {"attempt": again["attempt"], "result": {"outcome": "failed", "message": "disk gone"}},
                agent,
            )

        thread = threading.Thread(target=agent_runs_it)
        thread.start()
        rc, out, err = sledge(capsys, server, "events", job["id"], "--follow")
        thread.join()
        assert rc == 1 and out.strip() == f"{job['id']}: failed (disk gone)"
        assert "lease expired" in err and "started: attempt 2" in err
    finally:
        server.stop()
