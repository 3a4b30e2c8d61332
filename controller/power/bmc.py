"""The narrow interface every BMC driver offers, and a fake beside the real ones.

Drivers are blocking (sushy and pyghmi are): controller.power.service calls them in a worker
thread with a timeout, never on the event loop. A driver raises BmcError with the BMC's words.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Protocol

from controller.power.errors import BmcError
from controller.state.model import PowerState


class PowerAction(enum.StrEnum):
    ON = "on"
    OFF = "off"
    CYCLE = "cycle"  # off then on when on; on when off
    STATUS = "status"


class Bmc(Protocol):
    """One machine's BMC. Each call is one short exchange with it."""

    @property
    def name(self) -> str:
        """The BMC's address as shown in errors and events (never its credentials)."""

    def power_state(self) -> PowerState: ...
    def power_on(self) -> None: ...
    def power_off(self) -> None:
        """Hard off: the machine is re-imaged next, its OS need not shut down cleanly."""

    def power_cycle(self) -> None:
        """Reset a machine that is on; power on one that is off."""

    def boot_from_network_once(self) -> None:
        """The next boot (only) is from the network (PXE)."""


_ACTIONS = {  # as the real drivers name them in errors
    "status": "power status",
    "on": "power on",
    "off": "power off",
    "cycle": "power cycle",
    "pxe-once": "set one-time network boot",
}


@dataclass
class FakeBmc:
    """A BMC in memory: records calls; `fail` makes every call raise with those words."""

    name: str = "fake://bmc"
    state: PowerState = PowerState.OFF
    one_time_boot: str = ""
    calls: list[str] = field(default_factory=list)
    fail: str = ""
    hang: threading.Event | None = None  # set: calls block until it is set (a BMC that does not answer)

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.hang is not None:
            self.hang.wait()
        if self.fail:
            raise BmcError(self.name, _ACTIONS[what], self.fail)

    def power_state(self) -> PowerState:
        self._call("status")
        return self.state

    def power_on(self) -> None:
        self._call("on")
        self.state = PowerState.ON

    def power_off(self) -> None:
        self._call("off")
        self.state = PowerState.OFF

    def power_cycle(self) -> None:
        self._call("cycle")
        self.state = PowerState.ON
        self.one_time_boot = ""  # the boot consumed it

    def boot_from_network_once(self) -> None:
        self._call("pxe-once")
        self.one_time_boot = "pxe"
