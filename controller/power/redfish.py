"""Redfish through sushy (OpenStack Ironic's client). Imported only when a Redfish BMC is used."""

from __future__ import annotations

from typing import Any

import sushy
from sushy import exceptions as sushy_errors

from controller.power.address import BmcAddress
from controller.power.errors import BmcError
from controller.state.model import PowerState

_ON = {sushy.PowerState.ON, sushy.PowerState.POWERING_ON}


class RedfishBmc:
    def __init__(self, address: BmcAddress, username: str, password: str, timeout: float) -> None:
        self.address = address
        self.name = str(address)
        self._username = username
        self._password = password
        self._timeout = timeout
        self._system: Any = None

    def _words(self, exc: Exception) -> str:
        # sushy's messages carry the BMC's own error text (its @Message.ExtendedInfo) when there is one
        text = str(exc) or type(exc).__name__
        return text.replace(self._password, "***") if self._password else text

    def _get_system(self) -> Any:
        if self._system is None:
            root = sushy.Sushy(
                self.address.base_url,
                # HTTP basic auth: a Redfish session would outlive this one call and need logging out
                auth=sushy.auth.BasicAuth(self._username, self._password),
                verify=False,  # BMCs ship self-signed certificates; see docs/power.md
                server_side_retries=0,  # the caller's timeout bounds the call, not sushy's retries
                read_timeout=self._timeout,
                connect_timeout=self._timeout,
            )
            self._system = root.get_system(self.address.system)
        return self._system

    def _do(self, action: str, fn: Any) -> Any:
        try:
            return fn(self._get_system())
        except (sushy_errors.SushyError, OSError, ValueError) as exc:
            self._system = None
            raise BmcError(self.name, action, self._words(exc)) from None

    def power_state(self) -> PowerState:
        def ask(system: Any) -> PowerState:  # a driver lives for one call: the system was just read
            state = system.power_state
            return PowerState.ON if state in _ON else PowerState.OFF if state else PowerState.UNKNOWN

        result: PowerState = self._do("power status", ask)
        return result

    def power_on(self) -> None:
        self._do("power on", lambda s: s.reset_system(sushy.ResetType.ON))

    def power_off(self) -> None:
        self._do("power off", lambda s: s.reset_system(sushy.ResetType.FORCE_OFF))

    def power_cycle(self) -> None:
        def cycle(system: Any) -> None:
            on = system.power_state in _ON
            system.reset_system(sushy.ResetType.FORCE_RESTART if on else sushy.ResetType.ON)

        self._do("power cycle", cycle)

    def boot_from_network_once(self) -> None:
        self._do(
            "set one-time network boot",
            lambda s: s.set_system_boot_options(sushy.BootSource.PXE, sushy.BootSourceOverrideEnabled.ONCE),
        )
