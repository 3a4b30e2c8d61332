"""The agent runtime's error root (agent/errors.py draws the whole tree)."""

from __future__ import annotations

from agent.errors import SledgeError


class AgentError(SledgeError):
    """The agent's own configuration, its controller transport, or the seed it writes failed."""
