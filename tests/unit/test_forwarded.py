"""The client of a request that came through the operator's reverse proxies (controller.api.forwarded)."""

from __future__ import annotations

import pytest

from controller.api.forwarded import client_address, parse_proxies

PROXIES = parse_proxies(["127.0.0.1", "10.9.0.0/24", "fd00::/64"])


@pytest.mark.parametrize(
    ("remote", "forwarded", "client"),
    [
        # a request not from a proxy is taken at its address, whatever it says
        ("10.1.2.3", ["6.6.6.6"], "10.1.2.3"),
        ("10.1.2.3", [], "10.1.2.3"),
        # one proxy: the address it appended
        ("127.0.0.1", ["10.1.2.3"], "10.1.2.3"),
        # the client's own list stands left of what its proxy saw, and is never reached
        ("127.0.0.1", ["6.6.6.6, 10.1.2.3"], "10.1.2.3"),
        ("127.0.0.1", ["6.6.6.6", "10.1.2.3"], "10.1.2.3"),  # two header lines: one list
        # two proxies (a load balancer, then nginx): read from the right past both
        ("127.0.0.1", ["6.6.6.6, 10.1.2.3, 10.9.0.7"], "10.1.2.3"),
        # a proxy that saw no client address, or wrote something else: the nearest proxy
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["unknown"], "127.0.0.1"),
        ("127.0.0.1", ["10.1.2.3, 10.9.0.7:4711"], "127.0.0.1"),
        ("127.0.0.1", ["10.1.2.3, garbage, 10.9.0.7"], "10.9.0.7"),
        # every hop a proxy: the leftmost
        ("127.0.0.1", ["10.9.0.8, 10.9.0.7"], "10.9.0.8"),
        # IPv6, and an IPv4 client as a dual-stack socket sees it
        ("fd00::5", ["2001:db8::1"], "2001:db8::1"),
        ("::ffff:127.0.0.1", [" 10.1.2.3 "], "10.1.2.3"),
        ("::ffff:10.1.2.3", ["6.6.6.6"], "10.1.2.3"),
        # no address at all (a unix socket): nothing to believe
        ("", ["10.1.2.3"], ""),
    ],
)
def test_the_client_is_the_first_address_from_the_right_that_is_not_a_trusted_proxy(
    remote: str, forwarded: list[str], client: str
) -> None:
    assert client_address(remote, forwarded, PROXIES) == client


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("127.0.0.1", ["10.1.2.3"], ()) == "127.0.0.1"


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "proxy.example", "", "10.0.0.1/24/1"])
def test_a_proxy_that_is_no_address_nor_network_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=r"--trusted-proxy .*expected an address or a network"):
        parse_proxies(["127.0.0.1", bad])
