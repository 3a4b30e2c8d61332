"""`sledge-agent run`: the whole agent, in the live image or by hand on any Linux machine."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from agent.runtime import config as cfg


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run the agent: register, take jobs, report")
    p.add_argument(
        "--controller", help="controller URL (default: sledge.controller= on the kernel command line)"
    )
    p.add_argument("--token", help="one-time enrollment token (default: sledge.token=)")
    p.add_argument("--ca", help="PEM file pinning the controller's CA (https)")
    p.add_argument("--mac", help="the MAC this machine booted from (for re-enrollment)")
    p.add_argument("--state-dir", help="where the agent token is kept between restarts")
    p.add_argument("--allow-power", action="store_true", help="really reboot / power off when a job says so")
    p.add_argument(
        "--console-status",
        action="store_true",
        help="draw the agent's status on every kernel console (/sys/class/tty/console/active)",
    )
    p.add_argument("--max-jobs", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        config = cfg.from_system(
            {
                "controller": args.controller,
                "token": args.token,
                "ca": args.ca,
                "mac": args.mac,
                "state_dir": args.state_dir,
                "power": True if args.allow_power else None,
                "console_status": True if args.console_status else None,
            }
        )
    except cfg.ConfigError as exc:
        log(f"sledge-agent: {exc}")
        return 2
    if not config.controller:
        log("sledge-agent: no controller: give --controller URL or sledge.controller= on the kernel cmdline")
        return 2
    # imported here: `sledge-agent write` should not pay for the runtime's imports
    from agent.runtime.console import start_writers
    from agent.runtime.devices import BlockDisks, HttpSources
    from agent.runtime.loop import Agent
    from agent.runtime.machine import RealMachine
    from agent.runtime.status import StatusBoard
    from agent.runtime.transport import HttpTransport

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    status = StatusBoard(config.controller, config.mac)
    if config.console_status:
        start_writers(status, stop, log)
    agent = Agent(
        config,
        HttpTransport(config.controller, config.ca),
        RealMachine(config.power, log),
        log,
        stop,
        sources=HttpSources(config.ca),
        disks=BlockDisks(),
        status=status,
    )
    log(f"sledge-agent: controller {config.controller}")
    try:
        agent.run(args.max_jobs)
    except KeyboardInterrupt:
        return 130
    return 0
