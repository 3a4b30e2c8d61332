"""A dnsmasq configuration from a plan (pure): PXE ROMs get iPXE over TFTP, iPXE gets the boot script.

A machine's PXE ROM (no user class) is sent the iPXE binary for its architecture over TFTP:
BIOS undionly.kpxe, x86-64 UEFI snponly.efi (or ipxe.efi). That iPXE asks DHCP again, now
with user class "iPXE" and option 175, and is sent the controller's boot script URL.
`full` hands out addresses on an isolated network; `proxy` only adds the PXE answers beside
a site's own DHCP server (RFC 4578 proxyDHCP), which alone hands out addresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

from controller.boot.settings import BIOS_FILE, DhcpRange, Mode

# Client architectures (RFC 4578 option 93) that get the x86-64 EFI binary: 7 EFI BC
# (what most x86-64 firmware sends, OVMF too) and 9 EFI x86-64.
EFI_X64_ARCHES = (7, 9)


@dataclass(frozen=True)
class DnsmasqPlan:
    mode: Mode  # "proxy" or "full"
    boot_url: str  # the iPXE script iPXE clients chain, e.g. http://10.0.0.1:8470/boot.ipxe
    efi_file: str  # snponly.efi or ipxe.efi
    tftp_root: Path
    interface: str = ""  # empty: the site's own dnsmasq picks (sledge dhcp-config)
    address: IPv4Interface | None = None  # the interface's address and subnet
    range: DhcpRange | None = None  # full mode only
    lease_time: int = 3600
    lease_file: Path | None = None
    user: str = ""  # run as; empty: dnsmasq's default
    router_adverts: bool = False  # full mode on an interface with an IPv6 prefix


def render(plan: DnsmasqPlan) -> str:
    lines = [
        f"# sledge: network boot, {plan.mode} DHCP. Written by sledge; edits are overwritten.",
        "# no DNS: only DHCP and TFTP",
        "port=0",
    ]
    if plan.interface:
        lines += [f"interface={plan.interface}", "bind-interfaces"]
    if plan.user:
        lines.append(f"user={plan.user}")
    lines += _range_lines(plan)
    if plan.mode == "full" and plan.router_adverts and plan.interface:
        lines += [
            "# iPXE waits ~15 s for IPv6 autoconfiguration when no router answers: advertise the prefix;",
            "# DHCPv6 too, so that a UEFI HTTPv6 boot entry gets its answer (below) instead of timing out",
            "enable-ra",
            f"dhcp-range=::100,::1ff,constructor:{plan.interface},64,{plan.lease_time}",
        ]
    if plan.lease_file is not None:
        lines.append(f"dhcp-leasefile={plan.lease_file}")
    lines += [
        "enable-tftp",
        f"tftp-root={plan.tftp_root}",
        "# only files owned by dnsmasq's user: the iPXE binaries sledge put there",
        "tftp-secure",
        "# iPXE says so by user class and option 175; it gets the boot script, not iPXE again",
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:ipxe,175",
    ]
    lines += [f"dhcp-match=set:efi64,option:client-arch,{arch}" for arch in EFI_X64_ARCHES]
    lines += _boot_lines(plan)
    return "\n".join(lines) + "\n"


def _range_lines(plan: DnsmasqPlan) -> list[str]:
    if plan.mode == "full":
        if plan.range is None:
            raise ValueError("full DHCP needs a range")
        mask = f",{plan.address.netmask}" if plan.address is not None else ""
        return [
            f"dhcp-range={plan.range.start},{plan.range.end}{mask},{plan.lease_time}",
            "# the provisioning network has no other DHCP server",
            "dhcp-authoritative",
            "# no ICMP check of an address before offering it: it held every new machine's first",
            "# offer ~3 s (measured: iPXE's DHCP 5.2 s against 2.2 s with a lease), and sledge owns",
            "# this range",
            "no-ping",
        ]
    if plan.address is not None:
        net = plan.address.network
        return [f"dhcp-range={net.network_address},proxy,{net.netmask}"]
    return ["# set NETWORK to the provisioning subnet's address", "dhcp-range=NETWORK,proxy"]


def no_http_boot_url(boot_url: str) -> str:
    """What UEFI HTTP boot clients are sent: a URL on the controller that answers 404."""
    return boot_url.rsplit("/", 1)[0] + "/boot/no-http-boot.efi"


def _boot_lines(plan: DnsmasqPlan) -> list[str]:
    if plan.mode == "full":
        none = no_http_boot_url(plan.boot_url)
        return [
            "# no proxyDHCP here: iPXE need not wait for one (else ~10 s of dots at every boot)",
            "dhcp-option=tag:ipxe,encap:175,176,1b",
            f"dhcp-boot=tag:ipxe,{plan.boot_url}",
            f"dhcp-boot=tag:!ipxe,tag:efi64,{plan.efi_file}",
            f"dhcp-boot=tag:!ipxe,tag:!efi64,tag:!httpboot,{BIOS_FILE}",
            "# UEFI HTTP boot entries (vendor class HTTPClient) are not sledge's path: they get a URL",
            "# that fails at once, so that after iPXE's `exit` the firmware reaches the disk instead",
            "# of waiting 1-2 minutes for an offer with a boot URI on each of them (docs/boot.md)",
            "dhcp-vendorclass=set:httpboot,HTTPClient",
            "dhcp-option-force=tag:httpboot,60,HTTPClient",
            f"dhcp-boot=tag:httpboot,{none}",
            "dhcp-vendorclass=set:httpboot6,enterprise:343,HTTPClient",
            f"dhcp-option=tag:httpboot6,option6:bootfile-url,{none}",
        ]
    # proxyDHCP: the PXE ROM gets its file through the PXE boot menu (one entry per
    # architecture, so no menu is shown); iPXE reads the boot file name of the proxy offer.
    return [
        'pxe-prompt="sledge",0',
        f'pxe-service=tag:!ipxe,x86PC,"sledge iPXE (BIOS)",{BIOS_FILE}',
        f'pxe-service=tag:!ipxe,BC_EFI,"sledge iPXE (UEFI)",{plan.efi_file}',
        f'pxe-service=tag:!ipxe,x86-64_EFI,"sledge iPXE (UEFI)",{plan.efi_file}',
        f"dhcp-boot=tag:ipxe,{plan.boot_url}",
        f'pxe-service=tag:ipxe,x86PC,"sledge",{plan.boot_url}',
        f'pxe-service=tag:ipxe,BC_EFI,"sledge",{plan.boot_url}',
        f'pxe-service=tag:ipxe,x86-64_EFI,"sledge",{plan.boot_url}',
    ]
