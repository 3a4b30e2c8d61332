"""`sledge`: the controller and the operator's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent.image.chunk import ChunkInvalid
from agent.image.layout import LayoutError
from agent.image.manifest import ManifestError
from agent.image.store import StoreError
from agent.writer.errors import WriteError
from controller import image_cli, operator_cli, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sledge", description="sledge controller and operator CLI")
    sub = parser.add_subparsers(dest="cmd", required=True)
    image_cli.add_parser(sub)
    serve.add_parser(sub)
    operator_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "image":
            return image_cli.run(args)
        if args.cmd == "serve":
            return serve.run(args)
        if args.cmd in operator_cli.COMMANDS:
            return operator_cli.run(args)
    except (StoreError, ChunkInvalid, ManifestError, LayoutError, WriteError, OSError, ValueError) as exc:
        print(f"sledge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sledge: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
