"""An http(s) base URL, checked and parsed once, that opens connections to it.

Shared by the controller transport and the chunk sources: for https a pinned CA
(the agent's sledge.ca) replaces the system store, so only that CA is trusted.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Endpoint:
    url: str  # without a trailing slash
    host: str
    port: int | None
    prefix: str  # the URL's path, without a trailing slash
    tls: ssl.SSLContext | None
    query: str = ""  # the URL's query string (a signed or tokenised store URL): sent with every request

    @cached_property  # asked on every request (the connection pool's key)
    def origin(self) -> str:
        """scheme://host[:port], without the path."""
        parsed = urllib.parse.urlsplit(self.url)
        return f"{parsed.scheme}://{parsed.netloc}"

    @classmethod
    def parse(cls, url: str, what: str, ca_file: str = "") -> Endpoint:
        """`what` names the URL in the error ("controller", "chunk source")."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{what} {url!r}: expected an http:// or https:// URL")
        tls = ssl.create_default_context(cafile=ca_file or None) if parsed.scheme == "https" else None
        try:
            port = parsed.port
        except ValueError:
            raise ValueError(f"{what} {url!r}: invalid port") from None
        base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
        return cls(base, parsed.hostname, port, parsed.path.rstrip("/"), tls, parsed.query)

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
