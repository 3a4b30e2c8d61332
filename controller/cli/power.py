"""`sledge machine bmc`, `sledge power on|off|cycle|status` (through the controller's API) and
`sledge bmc rotate-key` (on the data directory itself). docs/power.md."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any

from controller.api import views
from controller.config import Config
from controller.power import vault
from controller.power.bmc import PowerAction
from controller.state.sqlite import SqliteStore

MAX_PASSWORD_FILE = 4096


def add_power_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("power", parents=[common], help="power a machine on or off through its BMC")
    p.add_argument("action", choices=[a.value for a in PowerAction])
    p.add_argument("machine", help="id, MAC or hostname")


def add_bmc_parsers(msub: Any, common: argparse.ArgumentParser) -> None:
    p = msub.add_parser(
        "bmc", parents=[common], help="set (or show, or --remove) a machine's BMC for power control"
    )
    p.add_argument("machine", help="id, MAC or hostname")
    p.add_argument(
        "address", nargs="?", help="redfish://HOST[:PORT]/redfish/v1/Systems/ID or ipmi://HOST[:PORT]"
    )
    p.add_argument("--user", default="", help="the BMC user")
    p.add_argument(
        "--password-file", type=Path, default=None, help="a file holding the BMC password ('-': stdin)"
    )
    p.add_argument("--remove", action="store_true", help="forget the machine's BMC")


def add_local_parser(sub: Any) -> None:
    p = sub.add_parser("bmc", help="BMC credentials at rest")
    bsub = p.add_subparsers(dest="bmc_cmd", required=True)
    r = bsub.add_parser("rotate-key", help="seal every BMC password with a new key in DATA/bmc.key")
    r.add_argument("--data", type=Path, default=None, help="data directory (default: $SLEDGE_DATA)")


def read_password(path: Path) -> str:
    from controller.cli.operator import CliError

    try:
        raw = (
            sys.stdin.read(MAX_PASSWORD_FILE + 1)
            if str(path) == "-"
            else path.read_text()[: MAX_PASSWORD_FILE + 1]
        )
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"password file {path}: {exc}") from None
    password = raw.rstrip("\r\n")
    if not password or len(raw) > MAX_PASSWORD_FILE or "\n" in password:
        raise CliError(f"password file {path}: expected one line holding the password")
    return password


def bmc_lines(b: views.BmcView) -> str:
    error = f"  (last poll: {b.power_error})" if b.power_error else ""
    return f"{b.machine_id}: BMC {b.address} as {b.username}; power {b.power}{error}"


def machine_bmc(c: Any, args: argparse.Namespace) -> int:
    from controller.cli.operator import CliError, emit

    path = f"/v1/machines/{urllib.parse.quote(args.machine, safe='')}/bmc"
    if args.remove:
        reply = c.call("DELETE", path)
        return int(emit(args, reply, f"{views.Deleted.from_wire(reply).deleted}: BMC removed"))
    if args.address is None:
        reply = c.call("GET", path)
        return int(emit(args, reply, bmc_lines(views.BmcView.from_wire(reply))))
    if not args.user or args.password_file is None:
        raise CliError("sledge machine bmc MACHINE ADDRESS: expected --user and --password-file")
    body = views.BmcSet(args.address, args.user, read_password(args.password_file))
    reply = c.call("PUT", path, body.to_wire())
    return int(emit(args, reply, bmc_lines(views.BmcView.from_wire(reply))))


def power(c: Any, args: argparse.Namespace) -> int:
    from controller.cli.operator import emit

    path = f"/v1/machines/{urllib.parse.quote(args.machine, safe='')}/power"
    reply = c.call("POST", path, views.PowerRequest(args.action).to_wire())
    b = views.BmcView.from_wire(reply)
    return int(emit(args, reply, f"{b.machine_id}: power {b.power} ({b.address})"))


def rotate_key(args: argparse.Namespace, config: Config) -> int:
    """Add a new key, re-seal every record with it in one transaction, then drop the old keys.
    A controller running meanwhile reads the key file on each call and opens either."""
    data = args.data or config.data_dir
    store = SqliteStore(data / "state.db")
    try:
        keys = vault.add_key(data)
        with store.transaction() as tx:
            records = tx.bmcs()
            for record in records:
                password = keys.open(record.sealed_password, record.machine_id)
                tx.put_bmc(replace(record, sealed_password=keys.seal(password, record.machine_id)))
    finally:
        store.close()
    new = vault.keep_only_first(data)
    print(f"bmc.key: now key {vault.key_id(new.keys[0])}; {len(records)} BMC password(s) re-sealed")
    return 0
