"""The agent runtime's error root (agent/errors.py draws the whole tree)."""

from __future__ import annotations

from agent.errors import SledgeError


class AgentError(SledgeError):
    """The agent's own configuration, or its controller transport, failed."""


class NoEnrollmentToken(AgentError):
    """The controller's boot script for this machine carries no enrollment token (yet)."""
