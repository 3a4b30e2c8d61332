"""Facts written once: the version (agent/__init__.py) and the agent API's paths (agent/protocol.py).
Everything else reads them, so a second copy that drifts fails here."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import agent
from agent import protocol as p
from agent.runtime.config import AgentConfig
from agent.runtime.devices import DirectorySources, SparseDisks
from agent.runtime.fake import FakeTransport
from agent.runtime.loop import Agent
from agent.runtime.machine import FakeMachine
from controller.app import routes
from tests.unit.test_controller_kit import inventory

REPO = Path(__file__).resolve().parents[2]


def test_the_version_is_written_once_in_the_agent_package() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools calls its [tool.setuptools] table beta
        built = read_configuration(REPO / "pyproject.toml")["project"]["version"]
    assert built == agent.__version__  # what a wheel (and so the live image) is stamped with
    literal = re.compile(rf"""["']{re.escape(agent.__version__)}["']""")
    copies = [
        str(path.relative_to(REPO))
        for top in ("agent", "controller", "scripts", "initramfs")
        for path in (REPO / top).rglob("*")
        if path.is_file()
        and path.suffix in ("", ".py", ".sh", ".toml", ".txt")
        and literal.search(path.read_text(errors="replace"))
    ]
    assert copies == ["agent/__init__.py"]


def test_the_agent_registers_with_the_package_version(tmp_path: Path) -> None:
    t = FakeTransport()
    sent: list[p.RegisterRequest] = []
    real = t.register

    def register(request: p.RegisterRequest) -> p.RegisterReply:
        sent.append(request)
        return real(request)

    t.register = register  # type: ignore[method-assign]
    t.add_job(p.JobKind.INVENTORY)
    mac = "52:54:00:00:00:01"
    config = AgentConfig(controller="http://c", token="enroll-1", mac=mac, state_dir=str(tmp_path))
    agent_ = Agent(
        config,
        t,
        FakeMachine(inventory()),
        lambda line: None,
        sources=DirectorySources(tmp_path / "store"),
        disks=SparseDisks(tmp_path / "disks", {}),
    )
    assert agent_.run(max_jobs=1) == 1
    assert [r.agent_version for r in sent] == [agent.__version__]


def agent_paths() -> dict[str, str]:
    """The agent API as protocol.py defines it, path -> method; {job_id} as the route's placeholder."""
    return {
        p.REGISTER_PATH: "POST",
        p.HEARTBEAT_PATH: "POST",
        p.INVENTORY_PATH: "POST",
        p.NEXT_JOB_PATH: "GET",
        p.job_events_path("{job_id}"): "POST",
        p.job_finish_path("{job_id}"): "POST",
        p.PEERS_PATH: "POST",
    }


def test_the_controller_serves_the_agent_api_at_the_protocol_paths() -> None:
    served = {r.path: r.method for r in routes() if r.path.startswith("/v1/agent/")}
    assert served == agent_paths()
    assert any(r.path == p.BOOT_SCRIPT_PATH and r.method == "GET" for r in routes())  # re-enrollment
    store = [r.path for r in routes() if "/store/" in r.path]
    assert store and all(path.startswith(p.STORE_PATH) for path in store), store


def test_the_agent_api_paths_are_the_documented_ones() -> None:
    doc = (REPO / "docs" / "controller.md").read_text()
    for path, method in agent_paths().items():
        assert f"`{method} {path.replace('{job_id}', '{job}')}" in doc, path
