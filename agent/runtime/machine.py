"""The real machine behind the Machine interface, and a fake for tests."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

from agent import protocol as p
from agent.hardware.inventory import collect
from agent.hardware.model import Inventory


class RealMachine:
    """Inventory from this machine; power actions only when allowed (the live image)."""

    def __init__(self, allow_power: bool, log: object = print) -> None:
        self.allow_power = allow_power
        self.log = log

    def inventory(self) -> Inventory:
        return collect()

    def power(self, action: p.PowerAction) -> None:
        if not self.allow_power:
            self.log(f"sledge-agent: would {action.value} now (power actions need sledge.power=1)")  # type: ignore[operator]
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


@dataclass
class FakeMachine:
    inv: Inventory
    actions: list[p.PowerAction] = field(default_factory=list)

    def inventory(self) -> Inventory:
        return self.inv

    def power(self, action: p.PowerAction) -> None:
        self.actions.append(action)
