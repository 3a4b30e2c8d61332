"""`sledge-agent`: the agent's command line. Each command lives in its own module
with `add_parser(subparsers)` and `run(args) -> int`; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

# module path, one per command group (each registers its own subcommands)
COMMAND_MODULES: tuple[str, ...] = ("agent.writer.cli", "agent.runtime.cli", "agent.hardware.cli")
# the module that defines each command, so a command imports only what it needs
# (start-up is part of every write's wall-clock time)
COMMANDS = {
    "write": "agent.writer.cli",
    "verify": "agent.writer.cli",
    "run": "agent.runtime.cli",
    "inventory": "agent.hardware.cli",
    "select-disk": "agent.hardware.cli",
}


def _modules(argv: Sequence[str] | None = None) -> list[ModuleType]:
    first = next(iter(argv or ()), None)
    names = (COMMANDS[first],) if first in COMMANDS else COMMAND_MODULES
    return [importlib.import_module(name) for name in names]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sledge-agent", description="sledge agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for module in _modules(argv):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        rc: int = args.run(args)
        return rc
    except KeyboardInterrupt:
        print("sledge-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
