"""`sledge`: the controller and the operator's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent.errors import SledgeError
from controller.cli import boot, images, mirror, operator, power, serve
from controller.config import from_environ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sledge", description="sledge controller and operator CLI")
    sub = parser.add_subparsers(dest="cmd", required=True)
    images.add_parser(sub)
    serve.add_parser(sub)
    boot.add_parser(sub)
    mirror.add_parser(sub)
    operator.add_parsers(sub)
    power.add_local_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = from_environ()
    try:
        if args.cmd == "image":
            return images.run(args, config)
        if args.cmd == "serve":
            return serve.run(args, config)
        if args.cmd == "dhcp-config":
            return boot.run(args, config)
        if args.cmd == "mirror-config":
            return mirror.run(args, config)
        if args.cmd == "bmc":
            return power.rotate_key(args, config)
        if args.cmd in operator.COMMANDS:
            return operator.run(args, config)
    except (SledgeError, OSError, ValueError) as exc:
        print(f"sledge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sledge: interrupted", file=sys.stderr)
        return 130
    return 2
