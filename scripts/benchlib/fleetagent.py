"""One agent of the real fleet case (fleetreal.py): the product's agent runtime, as `sledge-agent run`
runs it, in a network namespace of its own, writing to one loop device.

Everything is the product's (config from SLEDGE_* variables, HttpTransport, HttpSources,
BlockDisks, the job loop, deploy with its PeerSession) except the machine's inventory: all the
agents share this one host's hardware, so each reports its own system UUID, its namespace's
NIC (collected for real: the namespace's sysfs shows only its eth0) and, as its only disk, its
loop device. Without that, ten agents would be one machine to the controller, and the host's own
disks would be candidates for a deploy.

Run as: python scripts/benchlib/fleetagent.py --controller URL --disk /dev/loopN --uuid U --name NAME
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from agent.hardware.inventory import collect
from agent.hardware.model import Disk, Inventory
from agent.runtime import config as cfg
from agent.runtime.devices import BlockDisks, HttpSources
from agent.runtime.loop import Agent
from agent.runtime.machine import FakeMachine
from agent.runtime.transport import HttpTransport


def loop_disk(path: str) -> Disk:
    """The loop device as the one disk of this machine: a virtio disk for disk selection."""
    name = Path(os.path.realpath(path)).name
    size = int(Path(f"/sys/class/block/{name}/size").read_text()) * 512
    return Disk(
        "vda", path, "disk", size, "SLEDGE FLEET", None, f"FLEET-{name}", None, None, None,
        False, False, False, 512, 512, "virtio", None, (), (), (), (), (), False,
    )  # fmt: skip


def machine_inventory(disk: str, uuid: str, name: str) -> Inventory:
    real = collect()
    nics = tuple(dataclasses.replace(n, physical=True) for n in real.nics if n.name == "eth0")
    if not nics:
        raise SystemExit(
            f"fleetagent {name}: no eth0 in this namespace (found {[n.name for n in real.nics]})"
        )
    system = dataclasses.replace(real.system, uuid=uuid, serial=f"FLEET-{name}", hostname=name)
    return dataclasses.replace(real, system=system, nics=nics, disks=(loop_disk(disk),))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--controller", required=True)
    parser.add_argument("--disk", required=True)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--max-jobs", type=int, default=1)
    args = parser.parse_args()
    inventory = machine_inventory(args.disk, args.uuid, args.name)
    mac = inventory.nics[0].mac or ""
    config = cfg.from_system({"controller": args.controller, "mac": mac, "state_dir": args.state_dir})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent = Agent(
        config,
        HttpTransport(config.controller, config.ca),
        FakeMachine(inventory),
        log,
        stop,
        sources=HttpSources(config.ca),
        disks=BlockDisks(),
    )
    log(f"fleetagent {args.name}: {config.controller}, disk {args.disk}, mac {mac}, peers {config.peers}")
    agent.run(args.max_jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
