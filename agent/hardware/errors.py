"""The hardware package's error root (agent/errors.py draws the whole tree)."""

from __future__ import annotations

from agent.errors import SledgeError


class HardwareError(SledgeError):
    """An inventory, a root device hint or a disk selection that cannot be used."""
