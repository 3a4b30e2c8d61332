"""The agent ships alone in the live image: it must never import controller/."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import agent

AGENT_DIR = Path(agent.__file__).parent


def imports(root: Path, package: str) -> list[tuple[str, str]]:
    """(file:line, module) for every absolute import of `package` (or of its modules) under root;
    `from agent import protocol` counts as agent.protocol."""
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = (
                    [node.module] if node.module != package else [f"{package}.{a.name}" for a in node.names]
                )
            found += [(f"{path}:{node.lineno}", n) for n in names if n.split(".")[0] == package]
    return found


def test_no_agent_source_file_imports_controller() -> None:
    assert imports(AGENT_DIR, "controller") == []


def test_importing_every_agent_module_loads_no_controller_module() -> None:
    modules = [m.name for m in pkgutil.walk_packages([str(AGENT_DIR)], prefix="agent.")]
    assert "agent.image.manifest" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m == 'controller' or m.startswith('controller.')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_command_is_defined_by_the_module_the_cli_lists_for_it() -> None:
    import argparse
    import importlib

    from agent.cli import COMMAND_MODULES, COMMANDS

    for name, module_name in COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="cmd")
        importlib.import_module(module_name).add_parser(sub)
        assert name in sub.choices, f"{module_name} does not define {name!r}"
    everything = argparse.ArgumentParser()
    sub = everything.add_subparsers(dest="cmd")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)
    assert set(sub.choices) == set(COMMANDS)


# The controller may use the agent's shared pieces (wire formats, image format, hardware model,
# the writer and its block-device helpers, progress display), never its runtime or its CLIs.
CONTROLLER_MAY_USE = (
    "agent.protocol",
    "agent.codec",
    "agent.wire",
    "agent.image",
    "agent.hardware.model",
    "agent.hardware.wire",
    "agent.hardware.hints",
    "agent.writer",
    "agent.disk",
    "agent.blockdev",
    "agent.endpoint",
    "agent.progress",
    "agent.errors",
    # the peer ticket and have-bitmap formats (the tracker issues and reads them), not the peer runtime
    "agent.peer.ticket",
    "agent.peer.bitmap",
    "agent.peer.errors",
)


def test_the_controller_uses_only_the_agents_shared_pieces() -> None:
    controller_dir = AGENT_DIR.parent / "controller"
    found = imports(controller_dir, "agent")
    assert any(name == "agent.protocol" for _, name in found)  # the scan sees imports at all
    offenders = [
        f"{where} {name}"
        for where, name in found
        if not any(name == ok or name.startswith(ok + ".") for ok in CONTROLLER_MAY_USE)
    ]
    assert offenders == []


def test_the_layering_rule_catches_a_runtime_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("from agent.runtime.loop import Agent\nimport agent.cli\n")
    names = {name for _, name in imports(tmp_path, "agent")}
    assert names == {"agent.runtime.loop", "agent.cli"}
    assert not any(n.startswith(ok) for n in names for ok in CONTROLLER_MAY_USE)


def test_boto3_is_loaded_only_when_a_bucket_is_used() -> None:
    """The live image installs the agent's dependencies alone; a controller on a local store
    runs without the `sledge[s3]` extra."""
    code = (
        "import importlib, pkgutil, sys, agent\n"
        "for m in pkgutil.walk_packages(agent.__path__, prefix='agent.'): importlib.import_module(m.name)\n"
        "import controller.cli, controller.app, controller.images.s3\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_disk_format_package_uses_no_other_agent_package() -> None:
    # agent.disk is shared by the writer, drift, seed and erase: it must not reach back into them.
    found = imports(AGENT_DIR / "disk", "agent")
    assert any(name.startswith("agent.disk") for _, name in found)  # the scan sees imports at all
    offenders = [
        f"{where} {name}"
        for where, name in found
        if not name.startswith("agent.disk") and name != "agent.errors"
    ]
    assert offenders == []


def test_bmc_clients_are_loaded_only_when_a_bmc_is_called() -> None:
    """sushy and cryptography are the `sledge[bmc]` extra: never in the agent's import graph, and
    a controller with no BMC records starts without them."""
    code = (
        "import importlib, pkgutil, sys, agent\n"
        "for m in pkgutil.walk_packages(agent.__path__, prefix='agent.'): importlib.import_module(m.name)\n"
        "assert not [m for m in sys.modules if m.startswith('controller')], 'agent imported controller'\n"
        "import controller.cli, controller.app, controller.power.service\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sushy', 'cryptography', 'pyghmi')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
