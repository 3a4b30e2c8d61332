"""The pure trust decisions: fingerprints and what changed, the failure limiter, the address check."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.hardware.model import Disk, Inventory
from agent.protocol import ProtocolError
from controller.trust import Refusal, address_refusal
from controller.trust.fingerprint import DiskId, Fingerprint, changes, fingerprint
from controller.trust.limits import FailureLimiter, Limit
from tests.unit.test_controller_kit import Clock, inventory

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"


def disk(
    name: str, serial: str | None, wwn: str | None = None, kind: str = "disk", removable: bool = False
) -> Disk:
    return Disk(
        name, f"/dev/{name}", kind, 1 << 30, "M", None, serial, wwn, None, None, False, removable, False,
        512, 512, "sata", None, (), (), (), (), (), False,
    )  # fmt: skip


def with_disks(inv: Inventory, *disks: Disk) -> Inventory:
    return replace(inv, disks=disks)


def test_fingerprint_keeps_fixed_disks_with_an_identity_and_permanent_macs() -> None:
    inv = with_disks(
        inventory(macs=(MAC2, MAC1)),
        disk("sda", "S1", "0x5000C500A1B2C3D4"),
        disk("sdb", None, None),  # nothing stable to bind
        disk("sdc", "USB1", removable=True),  # a stick left in
        disk("loop0", "L", kind="loop"),
        disk("nvme0n1", " N1 "),
    )
    fp = fingerprint(inv)
    assert fp == Fingerprint(
        "4c4c4544-0000-1000-8000-000000000001",
        (DiskId("N1", ""), DiskId("S1", "0x5000c500a1b2c3d4")),
        (MAC1, MAC2),
    )
    assert Fingerprint.from_wire(fp.to_wire()) == fp
    assert str(fp) == (
        "uuid 4c4c4544-0000-1000-8000-000000000001; disks serial=N1, serial=S1 wwn=0x5000c500a1b2c3d4;"
        f" macs {MAC1}, {MAC2}"
    )


def test_changes_name_exactly_what_differs() -> None:
    bound = fingerprint(with_disks(inventory(macs=(MAC1,)), disk("sda", "S1"), disk("sdb", "S2")))
    assert changes(bound, bound) == []
    replaced = fingerprint(with_disks(inventory(macs=(MAC1,)), disk("sda", "S1"), disk("sdb", "S9")))
    assert changes(bound, replaced) == ["disk serial=S2 removed", "disk serial=S9 added"]
    other = fingerprint(
        with_disks(inventory(uuid="ffff", macs=(MAC2,)), disk("sda", "S1"), disk("sdb", "S2"))
    )
    assert changes(bound, other) == [
        "system uuid 4c4c4544-0000-1000-8000-000000000001 -> ffff",
        f"mac {MAC1} removed",
        f"mac {MAC2} added",
    ]


def test_a_stored_fingerprint_is_read_strictly() -> None:
    with pytest.raises(ProtocolError, match=r"fingerprint.disks\[0\]"):
        Fingerprint.from_wire({"system_uuid": "", "disks": [{"serial": 1}], "macs": []})
    with pytest.raises(ProtocolError, match="fingerprint"):
        Fingerprint.from_wire({"system_uuid": "", "macs": [], "extra": 1})


def test_the_limiter_refuses_past_the_limit_until_the_window_passes() -> None:
    clock = Clock(1000.0)
    limiter = FailureLimiter({"mac": Limit(3, 60.0), "address": Limit(5, 60.0)}, clock)
    keys = [("address", "127.0.0.2"), ("mac", MAC1)]
    for _ in range(3):
        assert limiter.blocked(keys) is None
        limiter.fail(keys)
        clock.now += 1
    blocked = limiter.blocked(keys)
    assert blocked is not None and (blocked.key, blocked.failures) == (f"mac {MAC1}", 3)
    assert blocked.retry_after == pytest.approx(57.0)
    assert limiter.blocked([("address", "127.0.0.2"), ("mac", MAC2)]) is None  # 3 of 5 for the address
    clock.now += 57.5  # the first failure ages out
    assert limiter.blocked(keys) is None


def test_the_limiter_keeps_a_bounded_number_of_keys() -> None:
    limiter = FailureLimiter({"mac": Limit(1, 60.0)}, Clock(), max_keys=100)
    for i in range(1000):
        limiter.fail([("mac", f"m{i}")])
    assert len(limiter._failures) == 100
    assert limiter.blocked([("mac", "m999")]) is not None and limiter.blocked([("mac", "m0")]) is None


@pytest.mark.parametrize(
    ("peer", "booted_from", "leased", "dhcp", "refusal"),
    [
        ("127.0.0.1", "127.0.0.1", None, False, None),
        ("127.0.0.2", "127.0.0.1", None, False, Refusal.ADDRESS),
        ("127.0.0.1", None, None, False, None),  # a boot without DHCP of sledge's own
        ("127.0.0.1", None, "127.0.0.1", True, None),
        ("127.0.0.2", None, "127.0.0.1", True, Refusal.LEASE),
        ("127.0.0.1", None, None, True, Refusal.LEASE),  # sledge runs DHCP and leased it nothing
        ("127.0.0.2", "127.0.0.2", "127.0.0.1", True, Refusal.LEASE),
    ],
)
def test_address_check(
    peer: str, booted_from: str | None, leased: str | None, dhcp: bool, refusal: Refusal | None
) -> None:
    got = address_refusal(MAC1, peer, booted_from, leased, dhcp)
    assert (got[0] if got else None) is refusal
    if got:
        assert peer in got[1] and MAC1 in got[1]
