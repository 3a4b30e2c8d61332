"""The address a request came from, when it passed the operator's own reverse proxies.

Behind nginx, HAProxy or a load balancer every request comes from the proxy's address. The
controller uses a request's address for three things: the peer url the tracker hands to other
agents (a deploying agent serves chunks there), the per-address limit on failed enrollments, and
the boot and enrollment logs. Behind a proxy all three were the proxy's: every agent's peer url
pointed at the proxy, and one machine's failed enrollments counted against all.

`--trusted-proxy ADDRESS[/PREFIX]` names the proxies. A request from one of them is taken at the
word of its `X-Forwarded-For` header (as nginx's `$proxy_add_x_forwarded_for` writes it: the
client's own list, if it sent one, then the address the proxy saw), read from the right: the
first address that is not a trusted proxy is the client. Only the proxies' entries are believed:
whatever the client itself wrote stands to the left of the address its proxy appended and is never
reached, and a request that did not come from a trusted proxy is taken at its own address whatever
its headers say (nginx's `real_ip_recursive on` and gunicorn's `forwarded_allow_ips` read it the
same way). Name only the proxies: a client inside a trusted range is skipped like a proxy, and the
address it wrote to its left believed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
HEADER = "X-Forwarded-For"


def parse_proxies(values: Iterable[str]) -> tuple[Network, ...]:
    """`--trusted-proxy` values: an address or a network each."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"--trusted-proxy {value!r}: expected an address or a network, e.g. 10.0.0.5 or 10.0.0.0/24"
            ) from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return address


def client_address(remote: str, forwarded: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client of a request that came from `remote` with these X-Forwarded-For header values."""
    here = _address(remote)
    if here is None or not trusted:
        return remote
    hops = [hop for value in forwarded for hop in value.split(",")]
    while any(here in net for net in trusted) and hops:
        hop = _address(hops.pop())
        if hop is None:
            break  # "unknown", a port or a name: nothing left of it is a proxy's word
        here = hop
    return str(here)
