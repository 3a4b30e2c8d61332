"""The agent ships alone in the live image: it must never import controller/."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import agent

AGENT_DIR = Path(agent.__file__).parent


def test_no_agent_source_file_imports_controller() -> None:
    offenders = []
    for path in AGENT_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] == "controller"]
    assert offenders == []


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


def test_the_disk_format_package_uses_no_other_agent_package() -> None:
    # agent.disk is shared by the writer, drift, seed and erase: it must not reach back into them.
    offenders = []
    for path in (AGENT_DIR / "disk").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] == "agent" and not n.startswith("agent.disk")
            ]
    assert offenders == []
