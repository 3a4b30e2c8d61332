"""scripts/demo --os finds the installed OS by the addresses dnsmasq leased to the machine's MAC:
the latest first, every one of them (the live image and the OS lease with different client ids),
and nothing but IPv4 addresses, since they end up in ssh's argv."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from osdemo import Host, leased_addresses

MAC = "52:54:00:5e:d6:01"


def test_leases_latest_first_ipv4_only_this_mac(tmp_path: Path) -> None:
    leases = tmp_path / "leases"
    leases.write_text(
        f"1765000000 {MAC} 10.77.0.150 * 01:52:54:00:5e:d6:01\n"
        f"1765000050 {MAC.upper()} -oProxyCommand=touch_x * ff:00\n"  # not an address: never used
        "1765000060 52:54:00:00:00:02 10.77.0.9 other *\n"
        f"1765000100 {MAC} 10.77.0.196 sledge-demo ff:56:50:4d:98\n"
        f"1765000200 {MAC} 10.77.0.150 * 01:52:54:00:5e:d6:01\n"  # renewed: the latest again
        "garbage\n"
    )
    assert leased_addresses(leases, MAC) == ["10.77.0.150", "10.77.0.196"]
    assert leased_addresses(leases, "52:54:00:00:00:03") == []
    assert leased_addresses(tmp_path / "absent", MAC) == []


def test_ssh_reaches_the_address_from_inside_the_namespace() -> None:
    argv = Host("10.77.0.196", 22, "sl-1234").argv(Path("/k"), "true")
    assert argv[:4] == ["ip", "netns", "exec", "sl-1234"]
    assert argv[4] == "ssh" and argv[-2:] == ["op@10.77.0.196", "true"]
    assert Host(port=2222).argv(Path("/k"), "id")[0] == "ssh"  # the e2e test's forwarded port
