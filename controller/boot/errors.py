"""The boot package's one error root."""

from __future__ import annotations

from controller.errors import ControllerError


class BootError(ControllerError):
    """Network boot cannot be set up as asked."""


class OptionError(BootError, ValueError):
    """An option (a flag of `sledge serve` / `sledge dhcp-config`) that cannot work, by name."""

    def __init__(self, option: str, expected: str, actual: str) -> None:
        super().__init__(f"{option}: expected {expected}, got {actual}")
        self.option = option
        self.expected = expected
        self.actual = actual
