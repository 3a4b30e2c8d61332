"""From the operator's options to a checked dnsmasq set-up on disk: the I/O edge of controller/boot.

Every check names the option it blames, before anything starts: the interface exists and
has an address, the range lies in its subnet, machines can reach the boot URL, the iPXE
binaries exist and the TFTP root is readable, and dnsmasq itself accepts the file (--test).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

from controller.boot import dnsmasq, network, tftp
from controller.boot.errors import BootError, OptionError
from controller.boot.settings import DhcpOptions


@dataclass(frozen=True)
class BootNetwork:
    """A dnsmasq ready to run: its configuration written, its command line."""

    plan: dnsmasq.DnsmasqPlan
    conf_file: Path
    pid_file: Path
    argv: tuple[str, ...]

    @property
    def lease_file(self) -> Path | None:
        return self.plan.lease_file


def boot_dir(data_dir: Path) -> Path:
    return data_dir / "dnsmasq"


def default_url(options: DhcpOptions, port: int, tls: bool) -> str:
    """The controller URL on the provisioning interface, for a controller listening on a wildcard."""
    address = network.serving_address(network.read_link(options.interface))
    return f"{'https' if tls else 'http'}://{address.ip}:{port}"


def check_url(url: str) -> None:
    """iPXE fetches the boot script from here: it must be an address off this host."""
    host = urlsplit(url).hostname or ""
    try:
        unreachable = ip_address(host).is_loopback or ip_address(host).is_unspecified
    except ValueError:
        unreachable = host in ("", "localhost")
    if unreachable:
        raise OptionError("--url", "the controller's address on the provisioning network", repr(url))


def build_plan(options: DhcpOptions, data_dir: Path, controller_url: str) -> dnsmasq.DnsmasqPlan:
    if options.mode == "off":
        raise OptionError("--dhcp", "proxy or full", "off")
    link = network.read_link(options.interface)
    address = network.serving_address(link)
    if options.mode == "full":
        if options.range is None:
            raise OptionError("--dhcp-range", "FIRST,LAST for --dhcp full", "nothing")
        address = network.check_range(link, options.range)
    elif options.range is not None:
        raise OptionError(
            "--dhcp-range", "nothing with --dhcp proxy (the site's DHCP server leases)", str(options.range)
        )
    check_url(controller_url)
    here = boot_dir(data_dir)
    return dnsmasq.DnsmasqPlan(
        mode=options.mode,
        boot_url=f"{controller_url.rstrip('/')}/boot.ipxe",
        efi_file=options.efi_file,
        tftp_root=here / "tftp",
        interface=options.interface,
        address=address,
        range=options.range,
        lease_time=options.lease_time,
        lease_file=lease_file(data_dir) if options.mode == "full" else None,
        user=pwd.getpwuid(os.geteuid()).pw_name,  # tftp-secure: the owner of the copies
        router_adverts=link.ipv6_prefixes,
    )


def prepare(options: DhcpOptions, data_dir: Path, controller_url: str) -> BootNetwork:
    """Check the options, fill the TFTP root, write dnsmasq.conf and have dnsmasq check it."""
    plan = build_plan(options, data_dir, controller_url)
    tftp.fill(plan.tftp_root, options.ipxe_dir, options.boot_files)
    here = boot_dir(data_dir)
    conf = here / "dnsmasq.conf"
    try:
        tmp = here / ".dnsmasq.conf.tmp"
        tmp.write_text(dnsmasq.render(plan))
        os.replace(tmp, conf)
    except OSError as exc:
        raise BootError(f"dnsmasq configuration {conf}: {exc}") from exc
    argv = (
        options.dnsmasq,
        f"--conf-file={conf}",
        "--keep-in-foreground",
        "--log-facility=-",  # to stderr, which the supervisor reads into the controller's log
        f"--pid-file={here / 'dnsmasq.pid'}",
    )
    try:
        test = subprocess.run([*argv, "--test"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise OptionError("dnsmasq", f"{options.dnsmasq} (Debian package dnsmasq-base)", str(exc)) from exc
    if test.returncode != 0:
        raise BootError(f"dnsmasq refused {conf}: {(test.stderr or test.stdout).strip()}")
    return BootNetwork(plan, conf, here / "dnsmasq.pid", argv)


def lease_file(data_dir: Path) -> Path:
    """Where dnsmasq keeps its leases in full mode (controller.boot.leases reads it)."""
    return boot_dir(data_dir) / "leases"


__all__ = ["BootNetwork", "build_plan", "check_url", "default_url", "lease_file", "prepare"]
