"""The agent's one config object, from flags, environment and the kernel command line.

Precedence: flags > environment (SLEDGE_CONTROLLER, ...) > kernel command line
(sledge.controller=URL ...) > defaults. Parsing is pure; reading /proc/cmdline
and os.environ happens in `from_system`.
"""

from __future__ import annotations

import os
import shlex
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from agent.runtime.errors import AgentError


class ConfigError(AgentError, ValueError):
    pass


@dataclass(frozen=True)
class AgentConfig:
    controller: str = ""  # base URL, e.g. http://10.0.2.100:8080
    token: str = ""  # one-time enrollment token from the boot
    ca: str = ""  # PEM file to pin the controller's CA (https)
    mac: str = ""  # the MAC the machine booted from (iPXE ${net0/mac})
    state_dir: str = "/run/sledge"  # where the agent token survives an agent restart
    # a file that appears once the network is up: the live image's /init starts the agent beside
    # DHCP and makes it then (a lease, or every NIC tried a round); "": no wait
    network_mark: str = ""
    heartbeat: float = 10.0  # seconds; the controller's reply may lower it
    poll_wait: float = 25.0  # long-poll wait
    max_backoff: float = 60.0
    max_buffered_events: int = 10000
    workers: int = 0  # the writer's fetching threads; 0: sized to the cores
    shell: bool = False
    power: bool = False  # really reboot / power off (set in the live image)
    console_status: bool = False  # draw the status on every console (set in the live image)
    # sharing chunks with peers while deploying (docs/peers.md): off by default, since it opens a port
    peers: bool = False
    peer_host: str = "0.0.0.0"  # the address the peer server listens on
    peer_port: int = 0  # 0: any free port (the tracker learns it)
    peer_uploads: int = 1  # concurrent uploads (one, at the whole link: agent/peer/server.py, gate.py)
    peer_upload_rate: float = 0.0  # bytes/s over all uploads; 0: no cap
    peer_linger: float = 0.0  # seconds to keep serving after the write (the job ends then)

    def validate(self) -> AgentConfig:
        if self.controller:
            parsed = urllib.parse.urlsplit(self.controller)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigError(f"controller {self.controller!r}: expected an http:// or https:// URL")
        if self.ca and not Path(self.ca).is_file():
            raise ConfigError(f"ca {self.ca!r}: expected a PEM file")
        if not 0 <= self.peer_port <= 65535 or self.peer_uploads < 1:
            raise ConfigError(
                "peer_port/peer_uploads: expected 0..65535 and >= 1, "
                f"got {self.peer_port}/{self.peer_uploads}"
            )
        for name in ("heartbeat", "poll_wait", "max_backoff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: expected a positive number of seconds, got {getattr(self, name)}")
        return self


_KEYS = {f.name: f for f in fields(AgentConfig)}


def _coerce(name: str, value: str) -> object:
    kind = type(getattr(AgentConfig(), name))
    if kind is bool:
        return value.lower() in ("1", "true", "yes", "on", "")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a {kind.__name__}, got {value!r}") from None
    return value


def parse_cmdline(cmdline: str) -> dict[str, object]:
    """sledge.KEY=VALUE words of a kernel command line (dashes or underscores in KEY)."""
    out: dict[str, object] = {}
    try:
        words = shlex.split(cmdline)
    except ValueError:
        words = cmdline.split()
    for word in words:
        if not word.startswith("sledge."):
            continue
        key, _, value = word[len("sledge.") :].partition("=")
        key = key.replace("-", "_")
        if key in _KEYS:
            out[key] = _coerce(key, value)
    return out


def parse_environ(environ: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in _KEYS:
        value = environ.get("SLEDGE_" + key.upper())
        if value is not None:
            out[key] = _coerce(key, value)
    return out


def build(
    cmdline: str = "", environ: Mapping[str, str] | None = None, flags: Mapping[str, object] | None = None
) -> AgentConfig:
    values: dict[str, object] = {}
    values.update(parse_cmdline(cmdline))
    values.update(parse_environ(environ or {}))
    values.update({k: v for k, v in (flags or {}).items() if v is not None and k in _KEYS})
    return replace(AgentConfig(), **values).validate()  # type: ignore[arg-type]


def from_system(flags: Mapping[str, object] | None = None, proc: str = "/proc") -> AgentConfig:
    try:
        cmdline = Path(proc, "cmdline").read_text()
    except OSError:
        cmdline = ""
    return build(cmdline, os.environ, flags)
