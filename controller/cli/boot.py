"""`sledge dhcp-config`: the dnsmasq configuration for a site that runs its own dnsmasq.

The same answers `sledge serve --dhcp` gives, printed instead of run; the site copies Debian's
iPXE binaries (undionly.kpxe, snponly.efi) into its TFTP root. docs/boot.md has the ISC dhcpd
and Kea equivalents.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controller.boot import dnsmasq, network
from controller.boot.errors import OptionError
from controller.boot.prepare import check_url
from controller.boot.settings import DhcpOptions
from controller.cli.serve import add_dhcp_arguments, dhcp_from_args
from controller.config import Config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("dhcp-config", help="print a dnsmasq configuration for network boot")
    p.add_argument(
        "--url", required=True, help="the controller's URL as machines reach it, e.g. http://10.0.0.1:8470"
    )
    p.add_argument(
        "--tftp-root", type=Path, default=Path("/srv/tftp"), help="the site's TFTP root (default %(default)s)"
    )
    add_dhcp_arguments(p)
    p.set_defaults(dhcp="proxy")


def plan_for(options: DhcpOptions, url: str, tftp_root: Path) -> dnsmasq.DnsmasqPlan:
    """The plan for someone else's dnsmasq: no user or lease file of ours; the interface only if named."""
    if options.mode == "off":
        raise OptionError("--dhcp", "proxy or full", "off")
    check_url(url)
    address = None
    if options.interface:
        link = network.read_link(options.interface)
        address = network.serving_address(link)
        if options.range is not None:
            address = network.check_range(link, options.range)
    if options.mode == "full" and options.range is None:
        raise OptionError("--dhcp-range", "FIRST,LAST for --dhcp full", "nothing")
    return dnsmasq.DnsmasqPlan(
        mode=options.mode,
        boot_url=f"{url.rstrip('/')}/boot.ipxe",
        efi_file=options.efi_file,
        tftp_root=tftp_root,
        interface=options.interface,
        address=address,
        range=options.range if options.mode == "full" else None,
        lease_time=options.lease_time,
    )


def run(args: argparse.Namespace, base: Config) -> int:
    del base  # nothing of the controller's own settings applies to someone else's dnsmasq
    print(dnsmasq.render(plan_for(dhcp_from_args(args), args.url, args.tftp_root)), end="")
    return 0
