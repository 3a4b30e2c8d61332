"""A BMC address as an operator writes it: pure parsing, no I/O."""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from controller.power.errors import BmcAddressError

FORMS = "redfish://HOST[:PORT]/redfish/v1/Systems/ID or ipmi://HOST[:PORT]"
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_SYSTEM = re.compile(r"^/redfish/v1/Systems/[A-Za-z0-9._~@:+-]{1,128}$")


class Protocol(enum.StrEnum):
    REDFISH = "redfish"
    IPMI = "ipmi"


@dataclass(frozen=True)
class BmcAddress:
    protocol: Protocol
    host: str
    port: int
    system: str = ""  # Redfish: the system's path, /redfish/v1/Systems/ID
    tls: bool = False  # Redfish over https (redfish+https://)

    @property
    def base_url(self) -> str:
        """Redfish: the service root's scheme://host:port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.protocol is Protocol.IPMI:
            return f"ipmi://{host}:{self.port}"
        scheme = "redfish+https" if self.tls else "redfish"
        return f"{scheme}://{host}:{self.port}{self.system}"


def parse(text: str) -> BmcAddress:
    """redfish://HOST[:PORT]/redfish/v1/Systems/ID (redfish+https:// for TLS) or ipmi://HOST[:PORT]."""
    if len(text) > 512 or any(c.isspace() for c in text):
        raise BmcAddressError(f"BMC address {text[:80]!r}: expected {FORMS}")
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise BmcAddressError(f"BMC address {text!r}: expected {FORMS} ({exc})") from None
    host = url.hostname or ""
    if url.username or url.password:
        # credentials in the address would be shown wherever the address is
        raise BmcAddressError(f"BMC address {text!r}: expected no user or password in it (use --user)")
    if url.query or url.fragment or not _valid_host(host):
        raise BmcAddressError(f"BMC address {text!r}: expected {FORMS}")
    if url.scheme == "ipmi":
        if url.path not in ("", "/"):
            raise BmcAddressError(f"BMC address {text!r}: expected ipmi://HOST[:PORT], got path {url.path!r}")
        return BmcAddress(Protocol.IPMI, host, port or 623)
    if url.scheme in ("redfish", "redfish+http", "redfish+https"):
        if not _SYSTEM.match(url.path):
            raise BmcAddressError(
                f"BMC address {text!r}: expected the system's path /redfish/v1/Systems/ID, got {url.path!r}"
            )
        tls = url.scheme == "redfish+https"
        return BmcAddress(Protocol.REDFISH, host, port or (443 if tls else 80), url.path, tls)
    raise BmcAddressError(f"BMC address {text!r}: expected {FORMS}, got scheme {url.scheme!r}")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST.match(host))
