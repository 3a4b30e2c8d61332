"""`sledge-agent`: the agent's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sledge-agent", description="sledge agent")
    parser.add_subparsers(dest="cmd", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
