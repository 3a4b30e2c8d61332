"""A rack mirror: the nginx caching-proxy configuration `sledge mirror-config` prints.

Pure: options in, text out. The mirror answers GET /store/chunks/aa/HEX and /store/manifests/HEX
(names that are blake3 digests, so the bytes behind them never change) from its cache, fetching
each one from the upstream store once (`proxy_cache_lock`), keyed on the path alone. Nothing else
is proxied: the catalog (the one mutable file) and the controller's API answer 404 here, so a
mirror never serves a stale catalog or becomes a way around the controller's authentication.
Only 200 answers are cached: a 404 for a chunk uploaded a moment later, or a 307 to a
short-lived presigned URL, must not stick. Agents verify every byte, so the mirror needs no trust.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath

from agent.protocol import STORE_PATH
from controller.errors import ControllerError

MIRROR_PATH = "/store/"  # where the mirror serves the tree; agents get http://MIRROR:PORT/store/
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*$")
_SAFE_DIR = re.compile(r"^/[A-Za-z0-9._/-]+$")
DIGEST = "[0-9a-f]{64}"


class MirrorError(ControllerError, ValueError):
    """A mirror option that cannot make a working configuration, by flag."""

    def __init__(self, option: str, expected: str, actual: str) -> None:
        super().__init__(f"{option}: expected {expected}, got {actual!r}")
        self.option = option


@dataclass(frozen=True)
class Upstream:
    scheme: str  # http or https
    host: str  # a name or an address (IPv6 in brackets)
    port: int
    path: str  # the store tree's base path, ending in "/"

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MirrorPlan:
    upstream: Upstream
    listen: str  # nginx `listen` argument: ADDRESS:PORT
    cache_dir: PurePosixPath
    max_size: int  # bytes the cache may hold on disk
    inactive_days: int = 30  # a chunk nobody asked for in this long leaves the cache
    upstream_ca: PurePosixPath | None = None  # verify an https upstream against this CA file


def upstream_from(url: str, controller: bool, option: str) -> Upstream:
    """The store tree's base: a controller's URL (its store is at /v1/store/), or a store's own URL
    (an nginx on the store directory, a bucket or CDN prefix)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MirrorError(option, "an http(s) URL", url) from exc
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise MirrorError(option, "an http(s) URL", url)
    if parts.username or parts.password or parts.query or parts.fragment:
        raise MirrorError(option, "a URL without credentials, query or fragment", url)
    try:
        address = ipaddress.ip_address(host)
        host = f"[{address}]" if address.version == 6 else str(address)
    except ValueError:
        if not _HOST.match(host):
            raise MirrorError(option, "a host name of letters, digits, dots and dashes", host) from None
    path = parts.path or "/"
    if controller:
        if path.rstrip("/"):
            raise MirrorError(option, "the controller's URL without a path (e.g. http://10.0.0.1:8470)", url)
        path = STORE_PATH
    if not _PATH.match(path) or "/../" in f"{path}/" or "//" in path:
        raise MirrorError(option, "a plain path of letters, digits and ._~/-", path)
    path = path if path.endswith("/") else path + "/"
    default = 443 if parts.scheme == "https" else 80
    return Upstream(parts.scheme, host, port or default, path)


def parse_listen(text: str) -> str:
    """PORT, ADDRESS:PORT or [IPv6]:PORT, as nginx's `listen` takes it."""
    address, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MirrorError("--listen", "PORT or ADDRESS:PORT", text)
    if not address:
        return f"0.0.0.0:{int(port)}"
    try:
        ip = ipaddress.ip_address(address.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise MirrorError("--listen", "an IP address before the port", address) from None
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def check_dir(path: str, option: str) -> PurePosixPath:
    if not _SAFE_DIR.match(path) or "/../" in f"{path}/":
        raise MirrorError(option, "an absolute path of letters, digits and ._/-", path)
    return PurePosixPath(path)


def _size(n: int) -> str:
    for unit, shift in (("g", 30), ("m", 20), ("k", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def render(plan: MirrorPlan) -> str:
    if plan.max_size < 1 << 20:
        raise MirrorError("--max-size", "at least 1M (a cache of a few chunks at least)", str(plan.max_size))
    up = plan.upstream
    # keys: ~8000 per MB of zone; one per chunk of >= 1 MiB, so max_size/1M keys at most
    zone_mb = max(1, min(512, -(-plan.max_size // (1 << 20) // 8000)))
    tls = ""
    if up.scheme == "https":
        tls = f"""
        proxy_ssl_server_name on;
        proxy_ssl_name {up.host.strip("[]")};"""
        if plan.upstream_ca is not None:
            tls += f"""
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {plan.upstream_ca};"""
    return f"""\
# sledge rack mirror: an nginx caching proxy in front of a sledge chunk store.
# Generated by `sledge mirror-config`. It belongs in nginx's http {{}} block: save it as
# /etc/nginx/conf.d/sledge-mirror.conf (Debian's nginx includes that directory), check with
# `nginx -t`, then `systemctl reload nginx`. List it for agents with
#     sledge serve --mirror http://THIS-HOST:{plan.listen.rpartition(":")[2]}{MIRROR_PATH}
# Upstream store: {up.scheme}://{up.hostport}{up.path}

proxy_cache_path {plan.cache_dir} levels=1:2 keys_zone=sledge_store:{zone_mb}m max_size={_size(plan.max_size)}
                 inactive={plan.inactive_days}d use_temp_path=off;

upstream sledge_store_upstream {{
    server {up.hostport};
    keepalive 16;
}}

server {{
    listen {plan.listen};

    # Chunks and manifests are named by their blake3 digest: their bytes never change, so they
    # are cached for as long as there is room, fetched from the upstream once however many
    # agents ask at the same moment, and keyed on the path alone (query strings vary).
    location ~ "^{MIRROR_PATH}(chunks/[0-9a-f]{{2}}/{DIGEST}|manifests/{DIGEST})$" {{
        limit_except GET {{ deny all; }}
        proxy_pass {up.scheme}://sledge_store_upstream{up.path}$1$is_args$args;
        proxy_set_header Host {up.hostport};
        proxy_http_version 1.1;
        proxy_set_header Connection "";{tls}
        proxy_cache sledge_store;
        proxy_cache_key $uri;
        proxy_cache_valid 200 365d;
        proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 300s;
        proxy_cache_lock_age 300s;
        proxy_cache_use_stale error timeout updating;
        proxy_read_timeout 60s;
        add_header X-Cache-Status $upstream_cache_status always;
    }}

    # The catalog (mutable), the controller's API and anything else: not here.
    location / {{
        return 404;
    }}
}}
"""
