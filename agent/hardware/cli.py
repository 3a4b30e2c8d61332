"""`sledge-agent inventory` and `sledge-agent select-disk`: look, never touch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.hardware.errors import HardwareError
from agent.hardware.hints import select_disk
from agent.hardware.inventory import Inventory, collect
from agent.hardware.wire import to_wire


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("inventory", help="print this machine's hardware inventory as JSON")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.set_defaults(run=run_inventory)

    p = subparsers.add_parser(
        "select-disk",
        help="print the disk the root device hints choose (or why none is), writing nothing",
    )
    p.add_argument("--hints", metavar="JSON", help='root device hints, e.g. \'{"serial": "S3Z1NB0K"}\'')
    p.add_argument(
        "--inventory",
        metavar="FILE",
        type=Path,
        help="a saved `sledge-agent inventory` output (default: this machine)",
    )
    p.set_defaults(run=run_select_disk)


def run_inventory(args: argparse.Namespace) -> int:
    _print_json(collect().to_wire(), args.pretty)
    return 0


def run_select_disk(args: argparse.Namespace) -> int:
    try:
        hints = None if args.hints is None else _load_json(args.hints, "--hints")
        inventory = _load_inventory(args.inventory) if args.inventory else collect()
        disk = select_disk(inventory.disks, hints)
    except HardwareError as e:
        print(f"sledge-agent select-disk: {e}", file=sys.stderr)
        return 1
    _print_json(to_wire(disk), pretty=True)
    return 0


class CliInputError(HardwareError, ValueError):
    """A --hints or --inventory argument that is not what the command reads."""


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CliInputError(f"{source}: expected JSON, got {text[:200]!r} ({e})") from None


def _load_inventory(path: Path) -> Inventory:
    try:
        text = path.read_text()
    except OSError as e:
        raise CliInputError(f"--inventory {path}: {e.strerror}") from None
    return Inventory.from_wire(_load_json(text, f"--inventory {path}"))


def _print_json(value: Any, pretty: bool) -> None:
    print(json.dumps(value, indent=2 if pretty else None))
