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


def _modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sledge-agent", description="sledge agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for module in _modules():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.run(args)
        return rc
    except KeyboardInterrupt:
        print("sledge-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
