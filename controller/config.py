"""The controller's one config object, and the one place that reads the environment.

`sledge` builds a Config in controller.cli.main: defaults, then the environment
(SLEDGE_DATA, SLEDGE_URL, SLEDGE_TOKEN, SOURCE_DATE_EPOCH) through `from_environ`, then each
command's flags (dataclasses.replace). Everything below the CLI takes its values from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol import MAX_BODY, STORE_PATH
from controller.boot.settings import DhcpOptions
from controller.trust import Discovery

DEFAULT_PORT = 8470
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"


@dataclass(frozen=True)
class Config:
    """Settings of `sledge serve` and of the operator and image commands."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    public_url: str = ""  # the URL agents are told; default http(s)://host:port
    mirrors: tuple[str, ...] = ()  # more chunk store base URLs handed to agents (nginx, caches)
    # A bucket behind /v1/store/: what the local store lacks is answered with a redirect to a
    # presigned URL that lives presign_seconds (agents get no credentials).
    s3_store: str = ""  # s3://BUCKET[/PREFIX]
    s3_endpoint_url: str = ""
    presign_seconds: int = 300
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_poll_seconds: float = 30.0
    enrollment_ttl: float = 300.0  # seconds an enrollment token lives (a boot takes well under that)
    discovery: Discovery = Discovery.OPEN  # closed: only expected MACs and ones with a job enroll
    # Failed enrollments allowed per MAC and per address in failure_window seconds; more are refused
    # (429). An address is shared by every machine behind a NAT or proxy, so it gets more.
    failures_per_mac: int = 5
    failures_per_address: int = 20
    failure_window: float = 300.0
    # reverse proxies in front of the controller whose X-Forwarded-For is believed (addresses or
    # networks; controller/api/forwarded.py): without them every agent's peer url is the proxy's
    trusted_proxies: tuple[str, ...] = ()
    reap_interval: float = 2.0
    # Seconds between a deploying agent's tracker announces (sent to agents in every answer). A
    # young swarm spreads a chunk about one hop per announce, so shorter is faster; each announce
    # costs the controller one answer (docs/peers.md has the figures behind the value).
    announce_seconds: float = 1.0
    # Power through BMCs (docs/power.md): each BMC request's timeout; how often each machine's power
    # state is polled (jittered; many BMCs fall over when polled hard); how long a job waits for the
    # agent after powering its machine up.
    bmc_timeout: float = 20.0
    power_poll_seconds: float = 60.0
    boot_deadline: float = 900.0
    max_body: int = MAX_BODY
    kernel: str = "vmlinuz"  # under DATA/boot/
    initrd: str = "initrd.img"
    # Every console gets the kernel's and the agent's output (docs/boot.md); the last one is
    # /dev/console, where a crash's last words go: serial, which a BMC can log.
    kernel_args: str = "console=tty0 console=ttyS0,115200"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dhcp: DhcpOptions = field(default_factory=DhcpOptions)  # off unless --dhcp; see controller/boot
    # The operator commands' side: where the controller is, and the token to show it.
    controller_url: str = DEFAULT_URL
    operator_token: str = field(default="", repr=False)  # else read from DATA/operator.token
    # Reproducible imports: the `created` time of an image (unix seconds); None is now.
    source_date_epoch: int | None = None

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return store_dir(self.data_dir)

    @property
    def boot_dir(self) -> Path:
        return self.data_dir / "boot"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def sources(self) -> tuple[str, ...]:
        return (f"{self.url}{STORE_PATH}", *self.mirrors)


def from_environ(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Config:
    """The defaults as this process's environment sets them (flags override them later)."""
    env = os.environ if environ is None else environ
    epoch = env.get("SOURCE_DATE_EPOCH", "")
    return Config(
        data_dir=default_data_dir(env, euid),
        controller_url=env.get("SLEDGE_URL") or DEFAULT_URL,
        operator_token=env.get("SLEDGE_TOKEN", ""),
        source_date_epoch=int(epoch) if epoch.isdigit() else None,
    )


def default_data_dir(environ: Mapping[str, str], euid: int | None = None) -> Path:
    """$SLEDGE_DATA, else /var/lib/sledge as root, else ~/.local/share/sledge."""
    if environ.get("SLEDGE_DATA"):
        return Path(environ["SLEDGE_DATA"])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/sledge")
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "sledge"


def store_dir(data_dir: Path) -> Path:
    return data_dir / "store"
