"""The careful table reader and its users on crafted bytes (issue 19): what a hostile tenant could
leave on a disk, checked field by field; bounded work; the seed and the backup move refusing lies."""

from __future__ import annotations

import struct
import time
import uuid
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.disk.errors import NoSpace, SeedError, TableError
from agent.disk.gpt import relocate, seal_header
from agent.disk.seedplan import GPT_TYPE, plan_seed, seed_candidates
from agent.disk.tables import MAX_LOGICAL, Tables, read_tables
from tests.bounded import bounded
from tests.diskbytes import Disk, Part, gpt_disk, mbr_disk, reseal, reseal_entries

MiB = 1 << 20
SIZE = 64 * MiB
LAST = SIZE // 512 - 1


def tables(disk: Disk) -> Tables:
    return read_tables(disk.read, disk.size, disk.sector)


def two() -> Disk:
    return gpt_disk(SIZE, 512, [Part(2048, 4095, "efi"), Part(4096, LAST - 33, "root")])


def test_a_clean_gpt_is_trusted_in_both_copies() -> None:
    t = tables(two())
    assert t.notes == () and t.primary is not None and t.backup is not None
    assert t.primary.valid and t.backup.valid and t.backup.header.lba == LAST
    assert [(p.table, p.number, p.first, p.last) for p in t.partitions()] == [
        ("gpt primary", 1, 2048, 4095),
        ("gpt primary", 2, 4096, LAST - 33),
        ("gpt backup", 1, 2048, 4095),
        ("gpt backup", 2, 4096, LAST - 33),
    ]
    assert relocate(t) is None  # already the mirror at the end: nothing to write


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"revision": 0x00020000}, "revision 0x00020000, expected 0x00010000"),
        ({"size": 600}, "header size 600, expected 92..512"),
        ({"size": 91}, "header size 91"),
        ({"reserved": 7}, "reserved field 0x7, expected 0"),
        ({"my_lba": 2}, "MyLBA 2, expected 1 (where it was read)"),
        ({"alt_lba": 0}, "AlternateLBA 0, expected after the usable area"),
        ({"alt_lba": 3000}, "AlternateLBA 3000, expected after the usable area"),
        ({"alt_lba": LAST + 1}, f"inside the {LAST + 1}-sector disk"),
        ({"entries_lba": 0}, "entry array at LBA 0 (32 sectors), expected between LBA 2"),
        ({"entries_lba": 1}, "entry array at LBA 1"),
        ({"first_usable": 0}, "usable LBAs 0-"),
        (
            {"first_usable": 10},
            "entry array at LBA 2 (32 sectors), expected between LBA 2 and the first usable LBA 10",
        ),
        ({"last_usable": LAST}, "AlternateLBA"),
        ({"last_usable": LAST + 100}, "usable LBAs 34-"),
        ({"first_usable": 5000, "last_usable": 4000}, "in order"),
        ({"entry_size": 100}, "entry size 100, expected 128 times a power of two"),
        ({"entry_size": 192}, "entry size 192"),
        ({"count": 0}, "0 entries of 128 bytes"),
        ({"count": 1 << 31}, "2147483648 entries of 128 bytes, expected 1..16777216 bytes"),
        ({"entries_crc": 1}, "CRC"),
    ],
)
def test_every_header_field_is_checked(fields: dict[str, int], problem: str) -> None:
    disk = two()
    reseal(disk, 1, **fields)
    start = time.monotonic()
    t = tables(disk)
    assert time.monotonic() - start < 1
    assert t.primary is not None and not t.primary.valid
    assert any(problem in p for p in t.primary.problems), t.primary.problems
    assert relocate(t) is None  # nothing is moved on a distrusted primary
    with pytest.raises(TableError, match="the primary GPT is not trusted"):
        plan_seed(t, 4 * MiB, disk="/dev/sdz")
    # the backup is still there, trusted: erase still sees the partitions
    assert {(p.first, p.last) for p in t.partitions()} == {(2048, 4095), (4096, LAST - 33)}


def test_a_bad_header_crc_and_entries_outside_the_usable_area() -> None:
    disk = two()
    hdr = bytearray(disk.read(512, 512))
    hdr[40] ^= 1
    disk.write(512, bytes(hdr))
    assert "header CRC" in " ".join(tables(disk).primary.problems)  # type: ignore[union-attr]
    disk = two()
    entries = bytearray(disk.read(1024, 512))
    struct.pack_into("<Q", entries, 32, 10)  # partition 1 starts on the entry array
    disk.write(1024, bytes(entries))
    reseal_entries(disk, 1)
    problems = tables(disk).primary.problems  # type: ignore[union-attr]
    assert any("partition 1 LBA 10-4095, expected inside the usable LBAs 34-" in p for p in problems)
    disk = gpt_disk(SIZE, 512, [Part(2048, 8191), Part(8000, 9000)])
    assert any("partitions 1 and 2 overlap" in p for p in tables(disk).primary.problems)  # type: ignore[union-attr]


def test_the_array_elsewhere_a_high_slot_and_a_zeroed_primary() -> None:
    """Issue 19 item 1: every partition a valid table lists is found."""
    t = tables(gpt_disk(SIZE, 512, [Part(4096, 8191)], entries_lba=2048))  # sgdisk -j 2048
    assert t.primary is not None and t.primary.valid
    assert [(p.first, p.last) for p in t.partitions() if p.table == "gpt primary"] == [(4096, 8191)]
    assert (2048 * 512, 16384) in t.structures()
    t = tables(gpt_disk(SIZE, 512, [Part(2048, 4095), Part(8192, 9000)], count=512, slots=[0, 299]))
    assert [(p.number, p.first) for p in t.partitions() if p.table == "gpt primary"] == [
        (1, 2048),
        (300, 8192),
    ]
    disk = two()
    disk.write(512, bytes(512))
    t = tables(disk)
    assert t.primary is None and t.backup is not None and t.backup.valid
    assert {p.first for p in t.partitions()} == {2048, 4096}
    assert (LAST * 512, 512) in t.structures()


def test_a_middle_backup_and_a_stale_tenant_backup_at_the_end_are_both_seen() -> None:
    disk = gpt_disk(SIZE, 512, [Part(2048, 4095)], image_size=16 * MiB)
    stale = gpt_disk(SIZE, 512, [Part(40000, 50000, "tenant")])
    for lba in range(LAST - 32, LAST + 1):
        disk.write(lba * 512, stale.read(lba * 512, 512))
    t = tables(disk)
    lbas = sorted(c.header.lba for c in t.copies)
    assert lbas == [1, 16 * MiB // 512 - 1, LAST]
    assert {p.first for p in t.partitions(trusted_only=False)} == {2048, 40000}
    plan = relocate(t)
    assert plan is not None and plan.cleared == 16 * MiB // 512 - 1
    for offset, data in plan.writes:
        disk.write(offset, data)
    after = tables(disk)
    assert after.notes == () and after.backup is not None and after.backup.header.lba == LAST
    assert {p.first for p in after.partitions()} == {2048}


def test_item3_alternate_already_at_the_end_but_the_backup_there_is_a_strangers() -> None:
    disk = two()
    stale = gpt_disk(SIZE, 512, [Part(40000, 50000, "tenant")])
    for lba in range(LAST - 32, LAST + 1):
        disk.write(lba * 512, stale.read(lba * 512, 512))
    t = tables(disk)
    assert any("disagrees with the primary" in n for n in t.notes)
    plan = relocate(t)
    assert plan is not None and plan.cleared is None
    assert {off for off, _ in plan.writes} == {(LAST - 32) * 512, LAST * 512}  # the backup only
    for offset, data in plan.writes:
        disk.write(offset, data)
    assert tables(disk).notes == ()


def test_item2_the_old_backup_is_cleared_only_where_a_real_header_is() -> None:
    disk = gpt_disk(SIZE, 512, [Part(2048, 4095)], image_size=16 * MiB)
    old = 16 * MiB // 512 - 1
    disk.write(old * 512, b"not a header".ljust(512, b"."))
    plan = relocate(tables(disk))
    assert plan is not None and plan.cleared is None
    assert old * 512 not in {off for off, _ in plan.writes}
    # a hybrid MBR with AlternateLBA 0: never trusted, the MBR is left alone
    disk = two()
    mbr = bytearray(disk.read(0, 512))
    mbr[462:478] = bytes([0, 0, 0, 0, 0x07, 0, 0, 0]) + struct.pack("<II", 2048, 2048)
    disk.write(0, bytes(mbr))
    reseal(disk, 1, alt_lba=0)
    assert relocate(tables(disk)) is None


def test_item4_the_seed_refuses_lying_headers_and_writes_nothing() -> None:
    for fields in ({"my_lba": 7}, {"entries_lba": 0}, {"first_usable": 1}, {"last_usable": LAST - 1}):
        disk = two()
        reseal(disk, 1, **fields)
        with pytest.raises(TableError, match="/dev/sdz: the primary GPT is not trusted"):
            plan_seed(tables(disk), 1 * MiB, disk="/dev/sdz")


def test_item5_a_full_16mib_array_of_cidata_entries_is_planned_in_bounded_time() -> None:
    count = 131072
    disk = Disk(2 << 30, 512)
    entries = bytearray(count * 128)
    name = "cidata".encode("utf-16-le").ljust(72, b"\0")
    for i in range(count):
        entries[i * 128 : i * 128 + 16] = GPT_TYPE.bytes_le
        entries[i * 128 + 16 : i * 128 + 32] = i.to_bytes(16, "little")
        struct.pack_into("<QQ", entries, i * 128 + 32, 65600 + i, 65600 + i)
        entries[i * 128 + 56 : i * 128 + 128] = name
    n = len(entries) // 512
    last = disk.size // 512 - 1
    hdr = bytearray(512)
    hdr[0:12] = b"EFI PART\x00\x00\x01\x00"
    struct.pack_into("<IIIQQQQ", hdr, 12, 92, 0, 0, 1, last, 2 + n, last - n - 1)
    struct.pack_into("<QIII", hdr, 72, 2, count, 128, zlib.crc32(entries))
    seal_header(hdr, 92)
    disk.write(512, bytes(hdr))
    disk.write(1024, bytes(entries))

    def plan() -> None:
        t = tables(disk)
        assert t.primary is not None and t.primary.valid and len(t.primary.used) == count
        candidates = seed_candidates(t)
        assert len(candidates) == 8  # a sector read each: bounded
        placement = plan_seed(t, 4 * MiB, disk="/dev/sdz", proven=frozenset({candidates[0].number}))
        assert placement.replaced and placement.number == 1

    cost = bounded(plan, seconds=20, mib=300)
    assert cost.seconds < 10, cost  # the quadratic planner took 104 s


def test_item6_an_unproven_cidata_partition_is_kept() -> None:
    disk = gpt_disk(
        SIZE, 512, [Part(2048, 8191, "root"), Part(LAST - 33 - 4096 - 8191, LAST - 33 - 4096, "cidata")]
    )
    t = tables(disk)
    placement = plan_seed(t, 1 * MiB, disk="/dev/sdz", guid_seed=b"x")  # nothing proven: a partition
    assert not placement.replaced and placement.number == 3
    with pytest.raises(NoSpace, match="after partition 2"):
        plan_seed(t, 8 * MiB, disk="/dev/sdz")
    proven = plan_seed(t, 1 * MiB, disk="/dev/sdz", proven=frozenset({2}))
    assert proven.replaced and proven.number == 2


def test_item7_a_tiny_disk_with_only_the_mbr_signature_is_a_seed_error() -> None:
    disk = Disk(3 * MiB, 512)
    disk.write(0, bytes(510) + b"\x55\xaa")
    with pytest.raises(NoSpace, match="an empty table"):
        plan_seed(tables(disk), 4 * MiB, disk="/dev/sdz")


def ebr(disk: Disk, lba: int, rel_start: int, count: int, link: int | None) -> None:
    raw = bytearray(512)
    raw[446 + 4] = 0x83
    struct.pack_into("<II", raw, 446 + 8, rel_start, count)
    if link is not None:
        raw[462 + 4] = 0x05
        struct.pack_into("<II", raw, 462 + 8, link, 4096)
    raw[510:512] = b"\x55\xaa"
    disk.write(lba * 512, bytes(raw))


def test_the_ebr_chain_is_walked_and_bounded() -> None:
    disk = mbr_disk(SIZE, [(0x83, 2048, 2048), (0x05, 8192, 65536)])
    ebr(disk, 8192, 2048, 2048, 8192)  # logical 5 at 10240; next EBR at 8192 + 8192
    ebr(disk, 16384, 2048, 2048, None)  # logical 6 at 18432
    t = tables(disk)
    assert [(p.table, p.number, p.first) for p in t.partitions()] == [
        ("mbr", 1, 2048),
        ("mbr", 2, 8192),
        ("ebr", 5, 10240),
        ("ebr", 6, 18432),
    ]
    ebr(disk, 16384, 2048, 2048, 0)  # links back to the first EBR: a loop
    t = tables(disk)
    assert [p.number for p in t.partitions() if p.table == "ebr"] == [5, 6]
    assert any("loops back to LBA 8192" in n for n in t.notes)
    long = mbr_disk(SIZE, [(0x05, 2048, 130000)])
    for i in range(400):
        ebr(long, 2048 + 64 * i, 1, 1, 64 * (i + 1))
    t = tables(long)
    assert len(t.mbr.logical) == MAX_LOGICAL  # type: ignore[union-attr]
    assert any(f"stopped after {MAX_LOGICAL} links" in n for n in t.notes)


def test_mbr_partitions_past_the_end_are_for_erase_only() -> None:
    disk = mbr_disk(SIZE, [(0x83, 2048, 2048), (0x83, LAST - 10, 100)])
    t = tables(disk)
    assert [p.number for p in t.partitions()] == [1]
    assert [p.number for p in t.partitions(trusted_only=False)] == [1, 2]
    assert any("reaches past the disk's last LBA" in n for n in t.notes)


def test_garbage_never_raises() -> None:
    for raw in (
        bytes(512),
        b"\xff" * 1024,
        b"EFI PART" * 200,
        bytes(510) + b"\x55\xaa" + b"EFI PART" + bytes(504),
    ):
        disk = Disk(4 * MiB, 512)
        disk.write(0, raw.ljust(-(-len(raw) // 512) * 512, b"\0"))
        t = tables(disk)
        relocate(t)
        with pytest.raises(SeedError):
            plan_seed(t, 8 * MiB)
    assert uuid.UUID(bytes_le=GPT_TYPE.bytes_le) == GPT_TYPE


U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
INTERESTING = {
    "revision": st.sampled_from([0x00010000, 0, 0x00010001, U32]),
    "size": st.sampled_from([92, 91, 0, 512, 513, U32]),
    "reserved": st.sampled_from([0, 1]),
    "my_lba": st.sampled_from([0, 1, 2, LAST, LAST + 1, U64]),
    "alt_lba": st.sampled_from([0, 1, 2, 3000, LAST - 1, LAST, LAST + 1, U64]),
    "first_usable": st.sampled_from([0, 1, 2, 33, 34, 35, 2048, LAST, U64]),
    "last_usable": st.sampled_from([0, 33, 34, 4095, LAST - 34, LAST - 33, LAST - 32, LAST, U64]),
    "entries_lba": st.sampled_from([0, 1, 2, 3, 33, 2048, LAST - 32, LAST, U64]),
    "count": st.sampled_from([0, 1, 4, 127, 128, 129, 131072, 131073, U32]),
    "entry_size": st.sampled_from([0, 8, 120, 128, 129, 256, 4096, U32]),
}


def field_values(name: str) -> st.SearchStrategy[int]:
    top = U64 if name in ("my_lba", "alt_lba", "first_usable", "last_usable", "entries_lba") else U32
    return st.one_of(INTERESTING[name], st.integers(0, top))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.dictionaries(st.sampled_from(sorted(INTERESTING)), st.integers(0, 0)).flatmap(
        lambda d: st.fixed_dictionaries({k: field_values(k) for k in d})
    ),
    where=st.sampled_from([1, LAST]),
    fix_crc=st.booleans(),
    fix_entries=st.booleans(),
)
def test_fuzz_header_fields(fields: dict[str, int], where: int, fix_crc: bool, fix_entries: bool) -> None:
    """Any header field values: no traceback, bounded time, and the seed and the move write only
    in the documented regions (LBA 0-1, the trusted primary's array, the disk's last sectors, an
    old backup header that is real), never inside a partition the trusted primary lists."""
    disk = two()
    if fix_crc:
        reseal(disk, where, **fields)
        if fix_entries:
            reseal_entries(disk, where)
    else:
        hdr = bytearray(disk.read(where * 512, 512))
        for name, value in fields.items():
            raw = bytearray(disk.read(where * 512, 512))
            reseal(disk, where, **{name: value})
            hdr[:92] = disk.read(where * 512, 512)[:92]
            hdr[16:20] = raw[16:20]  # keep the old CRC: a forger who did not fix it
        disk.write(where * 512, bytes(hdr))
    start = time.monotonic()
    t = tables(disk)
    moved = relocate(t)
    try:
        seed = plan_seed(t, 4 * MiB, guid_seed=b"f").writes
    except SeedError:
        seed = ()
    assert time.monotonic() - start < 2
    if t.primary is None or not t.primary.valid:
        assert moved is None and seed == ()
        return
    h = t.primary.header
    n = h.array_sectors(512)
    allowed = [(0, 1024), (h.entries_lba * 512, (h.entries_lba + n) * 512), ((LAST - n) * 512, SIZE)]
    if moved is not None and moved.cleared is not None:
        assert t.real_header_at(moved.cleared)
        allowed.append((moved.cleared * 512, moved.cleared * 512 + 512))
    parts = [(e.first * 512, (e.last + 1) * 512) for e in t.primary.used]
    for offset, data in [*(moved.writes if moved else []), *seed]:
        end = offset + len(data)
        assert any(a <= offset and end <= b for a, b in allowed), (offset, end, allowed)
        assert not any(offset < b and end > a for a, b in parts), (offset, end, parts)


@settings(max_examples=200, deadline=None)
@given(
    entries=st.binary(min_size=64, max_size=64),
    ebrs=st.lists(st.binary(min_size=32, max_size=32), max_size=8),
)
def test_fuzz_mbr_and_ebr_bytes(entries: bytes, ebrs: list[bytes]) -> None:
    disk = Disk(SIZE, 512)
    disk.write(0, bytes(446) + entries + b"\x55\xaa")
    for i, raw in enumerate(ebrs):  # EBRs where a chain is likely to look
        lba = struct.unpack_from("<I", entries, 16 * (i % 4) + 8)[0] % (LAST + 1)
        disk.write(lba * 512, bytes(446) + raw + bytes(32) + b"\x55\xaa")
    start = time.monotonic()
    t = tables(disk)
    assert time.monotonic() - start < 2
    assert t.mbr is not None and len(t.mbr.logical) <= MAX_LOGICAL
    for p in t.partitions():
        assert 0 <= p.first <= p.last < t.sectors
    try:
        plan = plan_seed(t, 1 * MiB)
    except SeedError:
        return
    assert [off for off, _ in plan.writes] == [0] and len(plan.writes[0][1]) == 512
    assert plan.start + plan.size <= SIZE
