"""What can go wrong in a fleet operation. The API maps these to HTTP statuses; here
they say only what is wrong, naming the object and what was expected."""

from __future__ import annotations

from controller.errors import ControllerError


class FleetError(ControllerError):
    """A fleet operation that cannot be done as asked."""


class NotFound(FleetError):
    """No such machine, job or image (or one the caller may not see)."""


class Conflict(FleetError):
    """The object exists but its state does not allow the change."""


class Invalid(FleetError):
    """A request that names things that cannot go together."""


class Denied(FleetError):
    """Credentials that are missing, wrong, used, expired or for another machine."""
