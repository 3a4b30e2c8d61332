"""The controller's error root and its part of the tree (agent/errors.py draws the rest).

SledgeError (agent.errors)
└── ControllerError
    ├── FleetError         controller.fleet: NotFound, Conflict, Invalid, Denied (the API maps them
    │                      to 404, 409, 400, 401)
    ├── StateError         controller.state: the database cannot be opened or is not sledge's
    ├── TransitionError    controller.jobs: a job change its state does not allow
    ├── AuthError          controller.auth: a token that is missing, malformed or wrong
    ├── ImageToolError     controller.images (also an OSError): SourceError, NbdError, ExportError,
    │                      SandboxError, ImageRefused (an image that names another file)
    ├── MirrorError        controller.images.mirror (also a ValueError): a `sledge mirror-config`
    │                      flag that cannot make a working nginx configuration
    ├── BootError          controller.boot: network boot cannot be set up as asked; OptionError
    │                      (also a ValueError) names the flag
    ├── PowerError         controller.power: BmcAddressError, VaultError (the key file), BmcError
    │                      (the BMC's own words; the API answers 502)
    └── CliError           controller.cli.operator: what ends an operator command
"""

from __future__ import annotations

from agent.errors import SledgeError


class ControllerError(SledgeError):
    """Any error the controller raises on purpose."""
