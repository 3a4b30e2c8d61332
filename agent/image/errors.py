"""The image package's error root (agent/errors.py draws the whole tree)."""

from __future__ import annotations

from agent.errors import SledgeError


class ImageError(SledgeError):
    """A manifest, chunk, store path or store that is not what the image format requires."""
