"""What goes wrong with a BMC: each error names the BMC (never its password)."""

from __future__ import annotations

from controller.errors import ControllerError


class PowerError(ControllerError):
    """A BMC record or a power action that cannot be done."""


class BmcAddressError(PowerError):
    """An address that is not redfish://HOST[:PORT]/redfish/v1/Systems/ID or ipmi://HOST[:PORT]."""


class VaultError(PowerError):
    """The BMC password key is missing, unreadable, too open, or does not open a sealed password."""


class BmcError(PowerError):
    """The BMC refused, failed or did not answer; the message carries the BMC's own words."""

    def __init__(self, bmc: str, action: str, words: str) -> None:
        super().__init__(f"BMC {bmc}: {action}: {words}")
        self.bmc = bmc
        self.action = action
        self.words = words
