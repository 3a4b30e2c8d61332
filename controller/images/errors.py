"""The image tools' error root (controller/errors.py draws the tree)."""

from __future__ import annotations

from controller.errors import ControllerError


class ImageToolError(ControllerError, OSError):
    """An image file, qemu-img/qemu-nbd or an export target that failed; an OSError for callers
    that handle I/O errors alike."""
