"""The real machine behind the Machine interface, and a fake for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import protocol as p
from agent.hardware.inventory import collect
from agent.hardware.model import Inventory


class RealMachine:
    """Inventory from this machine; power actions only when allowed (the live image)."""

    def __init__(self, allow_power: bool, log: Callable[[str], None] = print) -> None:
        self.allow_power = allow_power
        self.log = log

    def inventory(self) -> Inventory:
        settle_udev(self.log)
        return collect()

    def power(self, action: p.PowerAction) -> None:
        if not self.allow_power:
            self.log(f"sledge-agent: would {action.value} now (power actions need sledge.power=1)")
            return
        os.sync()
        time.sleep(0.5)  # let the console drain
        # sysrq acts at once and needs nothing else from the system; reboot -f is the fallback
        trigger = "b" if action is p.PowerAction.REBOOT else "o"
        try:
            with open("/proc/sysrq-trigger", "w") as f:
                f.write(trigger)
        except OSError:
            subprocess.run(["reboot" if action is p.PowerAction.REBOOT else "poweroff", "-f"], check=False)


UDEV_CONTROL = Path("/run/udev/control")  # udevd's socket: there while udevd runs
SETTLE_TIMEOUT = 60


def settle_udev(log: Callable[[str], None], control: Path = UDEV_CONTROL) -> None:
    """Wait until udevd has handled every device event queued so far, if udevd runs.

    The live image's /init does not wait for udev's coldplug (DHCP and the agent's start go on
    while storage drivers probe): the inventory waits here instead, so that it misses no disk
    and the udev properties of each (serial, WWN, by-path) are in udev's database.
    """
    udevadm = shutil.which("udevadm")
    if udevadm is None or not control.exists():
        return
    try:
        argv = [udevadm, "settle", f"--timeout={SETTLE_TIMEOUT}"]
        done = subprocess.run(argv, capture_output=True, timeout=SETTLE_TIMEOUT + 10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"sledge-agent: udevadm settle failed ({exc}); reading the devices as they are")
        return
    if done.returncode != 0:
        log(
            f"sledge-agent: udev still busy after {SETTLE_TIMEOUT} s (udevadm settle exited"
            f" {done.returncode}); reading the devices as they are"
        )


@dataclass
class FakeMachine:
    inv: Inventory
    actions: list[p.PowerAction] = field(default_factory=list)

    def inventory(self) -> Inventory:
        return self.inv

    def power(self, action: p.PowerAction) -> None:
        self.actions.append(action)
