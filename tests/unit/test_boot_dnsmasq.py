"""controller/boot's pure parts: option parsing, range checks, the dnsmasq configuration, leases."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from controller.boot import dnsmasq, leases, network
from controller.boot.errors import OptionError
from controller.boot.settings import DhcpRange, parse_efi, parse_lease_time, parse_mode, parse_range

BR0 = network.Link("br0", (IPv4Interface("10.0.0.1/24"),))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("120", 120), ("3600", 3600), ("90m", 5400), ("12h", 43200), ("200s", 200)],
)
def test_lease_time_parses(text: str, seconds: int) -> None:
    assert parse_lease_time(text) == seconds


@pytest.mark.parametrize("text", ["60", "1m", "", "1d", "-5", "1.5h", "abc"])
def test_lease_time_refused_names_the_option(text: str) -> None:
    with pytest.raises(OptionError) as exc:
        parse_lease_time(text)
    assert exc.value.option == "--lease-time"


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("10.0.0.5", "--dhcp-range"),
        ("10.0.0.9,10.0.0.5", "--dhcp-range"),
        ("10.0.0.5,10.0.0.300", "--dhcp-range"),
        ("fe80::1,fe80::9", "--dhcp-range"),
    ],
)
def test_bad_ranges_name_the_option(text: str, option: str) -> None:
    with pytest.raises(OptionError) as exc:
        parse_range(text)
    assert exc.value.option == option and text in str(exc.value)


def test_mode_and_efi_choices() -> None:
    assert parse_mode("proxy") == "proxy" and parse_efi("ipxe") == "ipxe"
    with pytest.raises(OptionError, match="--dhcp: expected one of off, proxy, full, got 'on'"):
        parse_mode("on")
    with pytest.raises(OptionError, match="--ipxe-efi"):
        parse_efi("grub")


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("10.0.0.100,10.0.0.200", "ok"),
        ("10.0.0.2,10.0.0.254", "ok"),
        ("10.0.1.2,10.0.1.9", "subnet"),
        ("10.0.0.200,10.0.1.5", "subnet"),
        ("10.0.0.0,10.0.0.9", "broadcast"),
        ("10.0.0.100,10.0.0.255", "broadcast"),
        ("10.0.0.1,10.0.0.9", "own address"),
    ],
)
def test_range_must_sit_inside_the_interface_subnet(text: str, verdict: str) -> None:
    r = parse_range(text)
    if verdict == "ok":
        assert network.check_range(BR0, r) == IPv4Interface("10.0.0.1/24")
        return
    with pytest.raises(OptionError) as exc:
        network.check_range(BR0, r)
    assert exc.value.option == "--dhcp-range" and verdict in str(exc.value)


def test_range_on_the_second_address_of_an_interface() -> None:
    link = network.Link("br0", (IPv4Interface("10.0.0.1/24"), IPv4Interface("192.168.7.1/25")))
    assert network.check_range(link, parse_range("192.168.7.10,192.168.7.20")) == link.addresses[1]
    with pytest.raises(OptionError, match=r"10.0.0.0/24, 192.168.7.0/25"):
        network.check_range(link, parse_range("192.168.7.200,192.168.7.210"))


def test_interface_without_address_is_refused() -> None:
    with pytest.raises(OptionError, match="--interface: expected an interface with an IPv4 address"):
        network.serving_address(network.Link("br0", ()))


def test_ip_json_parsing_keeps_ipv4_only_and_skips_junk() -> None:
    text = """[{"ifindex":3,"ifname":"br0","addr_info":[
        {"family":"inet","local":"10.0.0.1","prefixlen":24},
        {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
        {"ifname":"br1","addr_info":[{"family":"inet6","local":"fd77::1","prefixlen":64,"scope":"global"}]},
        {"ifname":"eth1"}, {"nothing":1}, 7]"""
    assert network.parse_ip_json(text) == [
        network.Link("br0", (IPv4Interface("10.0.0.1/24"),), ipv6_prefixes=False),
        network.Link("br1", (), ipv6_prefixes=True),
        network.Link("eth1", ()),
    ]


def test_missing_interface_is_named(tmp_path: Path) -> None:
    with pytest.raises(OptionError) as exc:
        network.read_link("sledge-no-such0")
    assert exc.value.option == "--interface" and "sledge-no-such0" in str(exc.value)
    for bad in ("", "../lo", ".."):
        with pytest.raises(OptionError):
            network.read_link(bad)


def plan(mode: str, **kw: object) -> dnsmasq.DnsmasqPlan:
    base: dict[str, object] = {
        "mode": mode,
        "boot_url": "http://10.0.0.1:8470/boot.ipxe",
        "efi_file": "snponly.efi",
        "tftp_root": Path("/var/lib/sledge/dnsmasq/tftp"),
        "interface": "br0",
        "address": IPv4Interface("10.0.0.1/24"),
    }
    base.update(kw)
    return dnsmasq.DnsmasqPlan(**base)  # type: ignore[arg-type]


def settings(text: str) -> list[str]:
    """The configuration's settings, comments dropped (dnsmasq has no trailing comments)."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all("#" not in line for line in lines), lines
    return lines


@pytest.mark.parametrize(
    ("mode", "kw", "present", "absent"),
    [
        (
            "full",
            {"range": DhcpRange(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.200")), "lease_time": 120},
            [
                "dhcp-range=10.0.0.100,10.0.0.200,255.255.255.0,120",
                "dhcp-authoritative",
                "no-ping",
                "dhcp-boot=tag:ipxe,http://10.0.0.1:8470/boot.ipxe",
                "dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi",
                "dhcp-boot=tag:!ipxe,tag:!efi64,tag:!httpboot,undionly.kpxe",
                "dhcp-option=tag:ipxe,encap:175,176,1b",
                "dhcp-vendorclass=set:httpboot,HTTPClient",
                "dhcp-boot=tag:httpboot,http://10.0.0.1:8470/boot/no-http-boot.efi",
                "dhcp-option=tag:httpboot6,option6:bootfile-url,http://10.0.0.1:8470/boot/no-http-boot.efi",
                "interface=br0",
                "bind-interfaces",
            ],
            ["pxe-service", "proxy", "enable-ra"],
        ),
        (
            "full",
            {
                "range": DhcpRange(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.200")),
                "router_adverts": True,
            },
            ["enable-ra", "dhcp-range=::100,::1ff,constructor:br0,64,3600"],
            [],
        ),
        (
            "full",
            {
                "range": DhcpRange(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.200")),
                "efi_file": "ipxe.efi",
                "lease_file": Path("/d/leases"),
                "user": "root",
            },
            ["dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi", "dhcp-leasefile=/d/leases", "user=root"],
            ["snponly"],
        ),
        (
            "proxy",
            {},
            [
                "dhcp-range=10.0.0.0,proxy,255.255.255.0",
                'pxe-service=tag:!ipxe,x86PC,"sledge iPXE (BIOS)",undionly.kpxe',
                'pxe-service=tag:!ipxe,x86-64_EFI,"sledge iPXE (UEFI)",snponly.efi',
                'pxe-service=tag:!ipxe,BC_EFI,"sledge iPXE (UEFI)",snponly.efi',
                "dhcp-boot=tag:ipxe,http://10.0.0.1:8470/boot.ipxe",
            ],
            [
                "dhcp-authoritative",
                "no-ping",
                "dhcp-leasefile",
                "user=",
                "encap:175",
                "enable-ra",
                "httpboot",
            ],
        ),
        (
            "proxy",
            {"interface": "", "address": None},
            ["dhcp-range=NETWORK,proxy", "tftp-root=/var/lib/sledge/dnsmasq/tftp"],
            ["interface=", "bind-interfaces"],
        ),
    ],
)
def test_configuration(mode: str, kw: dict[str, object], present: list[str], absent: list[str]) -> None:
    lines = settings(dnsmasq.render(plan(mode, **kw)))
    for line in ["port=0", "enable-tftp", "tftp-secure", "dhcp-match=set:ipxe,175", *present]:
        assert line in lines
    for word in absent:
        assert not any(word in line for line in lines), (word, lines)
    assert "dhcp-match=set:efi64,option:client-arch,7" in lines
    assert "dhcp-match=set:efi64,option:client-arch,9" in lines


@pytest.mark.parametrize(
    ("text", "mac", "now", "expected"),
    [
        (
            "2000 52:54:00:00:00:01 10.0.0.101 * 01:52:54:00:00:00:01\n",
            "52:54:00:00:00:01",
            1000,
            "10.0.0.101",
        ),
        ("2000 52:54:00:00:00:01 10.0.0.101 * *\n", "52:54:00:00:00:01", 3000, None),  # expired
        ("0 52:54:00:00:00:01 10.0.0.101 * *\n", "52:54:00:00:00:01", 3000, "10.0.0.101"),  # infinite
        ("2000 52:54:00:00:00:02 10.0.0.102 * *\n", "52:54:00:00:00:01", 1000, None),
        (
            "2000 52:54:00:00:00:01 10.0.0.101\n2500 52:54:00:00:00:01 10.0.0.109\n",
            "52:54:00:00:00:01",
            1000,
            "10.0.0.109",
        ),
        (
            "x 52:54:00:00:00:01 10.0.0.1\n2000 52:54:00:00:00:01 not-ip\n\n\x00junk\n",
            "52:54:00:00:00:01",
            1,
            None,
        ),
        ("2000 52:54:00:00:00:01 fe80::1 * *\n", "52:54:00:00:00:01", 1000, None),
    ],
)
def test_lease_lookup(text: str, mac: str, now: float, expected: str | None) -> None:
    found = leases.parse(text, mac, now)
    assert (str(found) if found else None) == expected


def test_lease_lookup_from_file(tmp_path: Path) -> None:
    path = tmp_path / "leases"
    assert leases.lookup(None, "52:54:00:00:00:01", 0) is None  # no DHCP of ours
    assert leases.lookup(path, "52:54:00:00:00:01", 0) is None  # no lease yet
    path.write_text("2000 52:54:00:00:00:01 10.0.0.101 * *\n")
    assert leases.lookup(path, "52:54:00:00:00:01", 1000) == IPv4Address("10.0.0.101")
    assert leases.lookup(path, "52:54:00:00:00:01".upper(), 1000) == IPv4Address("10.0.0.101")


def test_dnsmasq_leases_answer_address_by_mac(tmp_path: Path) -> None:
    path = tmp_path / "leases"
    path.write_text("2000 52:54:00:00:00:01 10.0.0.101 * *\n1500 52:54:00:00:00:02 10.0.0.102 * *\n")
    now = [1000.0]
    view = leases.DnsmasqLeases(path, clock=lambda: now[0])
    assert view.address("52:54:00:00:00:01") == "10.0.0.101"
    assert view.address("52:54:00:00:00:03") is None
    now[0] = 1600.0
    assert view.address("52:54:00:00:00:02") is None  # expired since
