"""The seed's pure parts: table planning (GPT, MBR), the FAT image, the NoCloud files."""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.disk.errors import NoSpace, SeedTooLarge, TableError
from agent.disk.mbr import mbr_partitions
from agent.disk.seedplan import GPT_TYPE, MiB, Placement, TableType, plan_seed, seed_candidates
from agent.disk.tables import Tables, read_tables
from agent.disk.vfat import FatFile, _checksum, _short_names, build_fat, layout, volume_label
from agent.protocol import CloudInit
from agent.runtime.seed import SeedContent
from tests.diskbytes import Disk, Part, gpt_disk, mbr_disk, read_gpt

WHEN = datetime(2024, 5, 6, 7, 8, 10, tzinfo=UTC)


def tables_of(disk: Disk) -> Tables:
    return read_tables(disk.read, disk.size, disk.sector)


def gpt_plan(
    disk: Disk, seed_size: int = 4 * MiB, guid_seed: bytes | None = b"t", proven: bool = True
) -> Placement:
    """proven: as if the caller found sledge's FAT in every cidata partition (the FAT itself is
    not on these byte-level disks; is_seed_fat has its own tests)."""
    tables = tables_of(disk)
    numbers = frozenset(c.number for c in seed_candidates(tables)) if proven else frozenset()
    return plan_seed(tables, seed_size, disk="/dev/sdx", guid_seed=guid_seed, proven=numbers)


def check_gpt(disk: Disk) -> list[bytes]:
    """Both copies valid, mirrored, the backup at the disk's end; the entries."""
    last = disk.size // disk.sector - 1
    primary, entries = read_gpt(disk, 1)
    backup, backup_entries = read_gpt(disk, last)
    assert struct.unpack_from("<QQ", primary, 24) == (1, last)
    assert struct.unpack_from("<QQ", backup, 24) == (last, 1)
    assert primary[40:72] == backup[40:72]
    assert entries == backup_entries
    return entries


def named(entries: list[bytes], name: str) -> list[int]:
    return [
        i for i, e in enumerate(entries) if e[56:128].decode("utf-16-le").rstrip("\0") == name and any(e[:16])
    ]


# GPT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sector", [512, 4096])
def test_gpt_seed_at_the_end_of_the_usable_area_after_free_space(sector: int) -> None:
    per_mib = MiB // sector
    disk = gpt_disk(
        256 * MiB, sector, [Part(per_mib, 33 * per_mib - 1, "EFI"), Part(33 * per_mib, 63 * per_mib - 1)]
    )
    plan = gpt_plan(disk)
    disk.apply(plan)
    entries = check_gpt(disk)
    (slot,) = named(entries, "cidata")
    assert plan.number == slot + 1 == 3
    assert plan.table is TableType.GPT and not plan.replaced
    entry = entries[slot]
    assert entry[:16] == GPT_TYPE.bytes_le
    first, last = struct.unpack_from("<QQ", entry, 32)
    primary = disk.read(sector, sector)
    assert last == struct.unpack_from("<Q", primary, 48)[0]  # LastUsableLBA
    assert first * sector % MiB == 0
    assert plan.start == first * sector and plan.size == (last - first + 1) * sector >= 4 * MiB
    assert plan.size < 5 * MiB
    assert entries[0][56:62].decode("utf-16-le") == "EFI"


def test_gpt_backup_in_the_middle_moves_to_the_end_in_the_same_plan() -> None:
    disk = gpt_disk(256 * MiB, 512, [Part(2048, 131038)], image_size=64 * MiB)
    old_backup = 64 * MiB // 512 - 1
    plan = gpt_plan(disk)
    disk.apply(plan)
    check_gpt(disk)
    assert disk.read(old_backup * 512, 512) == bytes(512)  # the stale backup header is gone
    (mbr,) = mbr_partitions(disk.head())
    assert (mbr.kind, mbr.start, mbr.sectors) == (0xEE, 1, 256 * MiB // 512 - 1)
    assert plan.start + plan.size == (256 * MiB // 512 - 33) * 512


def test_gpt_redeploy_replaces_the_seed_and_keeps_its_guid() -> None:
    disk = gpt_disk(256 * MiB, 512, [Part(2048, 131038)])
    first = gpt_plan(disk, guid_seed=b"one")
    disk.apply(first)
    guid = check_gpt(disk)[first.number - 1][16:32]
    second = gpt_plan(disk, seed_size=8 * MiB, guid_seed=b"two")
    disk.apply(second)
    entries = check_gpt(disk)
    assert named(entries, "cidata") == [first.number - 1]
    assert second.replaced and second.number == first.number
    assert entries[second.number - 1][16:32] == guid
    assert second.size >= 8 * MiB


def test_gpt_guid_is_fresh_and_unique() -> None:
    disk = gpt_disk(256 * MiB, 512, [Part(2048, 131038)])
    a, b = gpt_plan(disk, guid_seed=None), gpt_plan(disk, guid_seed=None)
    guids = set()
    for plan in (a, b):
        d = gpt_disk(256 * MiB, 512, [Part(2048, 131038)])
        d.apply(plan)
        guid = check_gpt(d)[plan.number - 1][16:32]
        assert uuid.UUID(bytes_le=guid).version == 4
        guids.add(guid)
    assert len(guids) == 2
    assert gpt_plan(disk, guid_seed=b"x") == gpt_plan(disk, guid_seed=b"x")


def test_gpt_first_free_slot_is_used() -> None:
    disk = gpt_disk(256 * MiB, 512, [Part(2048, 4095, "a"), Part(0, 0, "gap", bytes(16)), Part(4096, 8191)])
    assert gpt_plan(disk).number == 2


def test_gpt_no_space_at_the_end() -> None:
    disk = gpt_disk(64 * MiB, 512, [Part(2048, 64 * MiB // 512 - 34 - 2048)])
    with pytest.raises(NoSpace, match=r"/dev/sdx: the seed needs 4194304 bytes .* after partition 1"):
        gpt_plan(disk)


def test_gpt_no_space_even_after_moving_the_backup() -> None:
    disk = gpt_disk(65 * MiB, 512, [Part(2048, 64 * MiB // 512 - 34)], image_size=64 * MiB)
    with pytest.raises(NoSpace):
        gpt_plan(disk)


def test_gpt_all_entries_used() -> None:
    disk = gpt_disk(256 * MiB, 512, [Part(2048 + 8 * i, 2055 + 8 * i, f"p{i}") for i in range(128)])
    with pytest.raises(TableError, match="/dev/sdx: all 128 GPT entries are used"):
        gpt_plan(disk)


def test_gpt_damaged_header_and_entries_are_refused() -> None:
    disk = gpt_disk(256 * MiB, 512, [Part(2048, 131038)])
    header = disk.read(512, 512)
    disk.write(512, header[:40] + bytes([header[40] ^ 1]) + header[41:])
    with pytest.raises(TableError, match=r"/dev/sdx: the primary GPT is not trusted: .*header CRC"):
        gpt_plan(disk)
    disk = gpt_disk(256 * MiB, 512, [Part(2048, 131038)])
    entries = disk.read(1024, 512)
    disk.write(1024, bytes([entries[0] ^ 1]) + entries[1:])
    with pytest.raises(TableError, match=r"entry array .*CRC"):
        gpt_plan(disk)


def test_no_table_and_protective_mbr_without_gpt_are_refused() -> None:
    with pytest.raises(TableError, match="/dev/sdx: no partition table"):
        gpt_plan(Disk(64 * MiB, 512))
    disk = gpt_disk(64 * MiB, 512, [])
    disk.write(512, bytes(512))
    disk.write(64 * MiB - 512, bytes(512))
    with pytest.raises(TableError, match="protective MBR but no GPT header"):
        gpt_plan(disk)


@settings(max_examples=60, deadline=None)
@given(
    sector=st.sampled_from([512, 4096]),
    disk_mib=st.integers(8, 4096),
    ends=st.lists(st.integers(1, 4096), max_size=5),
    seed_mib=st.integers(1, 8),
)
def test_gpt_plan_properties(sector: int, disk_mib: int, ends: list[int], seed_mib: int) -> None:
    per_mib = MiB // sector
    bounds = sorted({e for e in ends if 1 < e < disk_mib})
    parts = [
        Part(a * per_mib, b * per_mib - 1, f"p{i}")
        for i, (a, b) in enumerate(zip([1, *bounds], bounds, strict=False))
    ]
    disk = gpt_disk(disk_mib * MiB, sector, parts)
    try:
        plan = gpt_plan(disk, seed_mib * MiB)
    except NoSpace:
        usable_end = (disk_mib * MiB // sector - 1 - 16384 // sector) * sector
        last_end = max([p.last + 1 for p in parts], default=0) * sector
        assert usable_end - last_end < seed_mib * MiB + MiB
        return
    disk.apply(plan)
    entries = check_gpt(disk)
    first, last = struct.unpack_from("<QQ", entries[plan.number - 1], 32)
    assert plan.start % MiB == 0 and plan.size >= seed_mib * MiB and plan.size < (seed_mib + 1) * MiB
    assert last == struct.unpack_from("<Q", disk.read(sector, sector), 48)[0]
    assert all(p.last < first for p in parts)
    assert [e for i, e in enumerate(entries) if i != plan.number - 1] == [
        e
        for i, e in enumerate(read_gpt(gpt_disk(disk_mib * MiB, sector, parts), 1)[1])
        if i != plan.number - 1
    ]
    again = gpt_plan(disk, seed_mib * MiB)
    assert (again.number, again.start, again.size, again.replaced) == (
        plan.number,
        plan.start,
        plan.size,
        True,
    )


# MBR ------------------------------------------------------------------------------------------


def mbr_plan(disk: Disk, seeds: frozenset[int] = frozenset()) -> Placement:
    return plan_seed(tables_of(disk), 4 * MiB, disk="/dev/sdy", proven=seeds)


def test_mbr_primary_partition_at_the_very_end() -> None:
    disk = mbr_disk(256 * MiB, [(0x0C, 2048, 65536), (0x83, 67584, 63488)])
    plan = mbr_plan(disk)
    disk.apply(plan)
    parts = mbr_partitions(disk.head())
    assert [(p.number, p.kind) for p in parts] == [(1, 0x0C), (2, 0x83), (3, 0x0C)]
    seed = parts[2]
    assert seed.last == 256 * MiB // 512 - 1 and seed.start * 512 % MiB == 0 and seed.sectors == 8192
    assert (plan.table, plan.number, plan.start, plan.size) == (TableType.MBR, 3, seed.start * 512, 4 * MiB)
    assert disk.head()[446 + 32 + 1 : 446 + 32 + 4] == bytes([32, 1, 32])  # CHS 32/32/1 of LBA 516096
    assert disk.head()[446 + 32 + 5 : 446 + 32 + 8] == bytes([162, 2, 32])  # CHS 32/162/2 of LBA 524287
    assert disk.head()[:446] == bytes(446) and disk.head()[510:512] == b"\x55\xaa"


def test_mbr_redeploy_reuses_the_seed_entry() -> None:
    disk = mbr_disk(256 * MiB, [(0x83, 2048, 2048), (0x0C, 300000, 8192), (0x83, 4096, 2048)])
    plan = mbr_plan(disk, frozenset({2}))
    assert plan.number == 2 and plan.replaced


def test_mbr_four_slots_used_is_refused() -> None:
    disk = mbr_disk(256 * MiB, [(0x83, 2048 * (i + 1), 2048) for i in range(4)])
    with pytest.raises(TableError, match=r"/dev/sdy: all 4 primary MBR entries are used .*extended"):
        mbr_plan(disk)


def test_mbr_free_space_inside_an_extended_partition_is_refused() -> None:
    disk = mbr_disk(256 * MiB, [(0x83, 2048, 2048), (0x05, 4096, 256 * MiB // 512 - 4096)])
    with pytest.raises(TableError, match="inside extended partition 2"):
        mbr_plan(disk)


def test_mbr_no_space() -> None:
    disk = mbr_disk(64 * MiB, [(0x83, 2048, 64 * MiB // 512 - 2048 - 4096)])
    with pytest.raises(NoSpace, match=r"/dev/sdy: .*2097152 bytes are free there .*after partition 1"):
        mbr_plan(disk)


def test_mbr_beyond_2tib_is_refused() -> None:
    disk = mbr_disk(3 << 40, [(0x83, 2048, 2048)])
    with pytest.raises(TableError, match="an MBR addresses at most"):
        mbr_plan(disk)


# FAT and files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sector", "bits", "per_cluster"),
    [(4 * MiB, 512, 16, 1), (4 * MiB, 4096, 12, 1), (1 * MiB, 512, 12, 1), (64 * MiB, 512, 16, 2)],
)
def test_fat_layout(size: int, sector: int, bits: int, per_cluster: int) -> None:
    lay = layout(size, sector)
    assert (lay.fat_bits, lay.per_cluster) == (bits, per_cluster)
    assert (lay.clusters < 4085) == (bits == 12)
    assert (lay.clusters + 2) * bits <= lay.fat_sectors * sector * 8
    assert lay.data_start + lay.clusters * lay.per_cluster <= lay.total


def test_fat_image_boot_sector_and_label() -> None:
    files = [FatFile("user-data", b"#cloud-config\n")]
    image = build_fat(files, 4 * MiB, when=WHEN, volume_id=0x1234ABCD, hidden_sectors=2048)
    assert len(image) == 4 * MiB
    assert volume_label(image[:512]) == "CIDATA"
    assert struct.unpack_from("<HBHBHHBH", image, 11) == (512, 1, 1, 2, 512, 8192, 0xF8, 32)
    assert struct.unpack_from("<I", image, 28)[0] == 2048
    assert image[54:62] == b"FAT16   "
    root = 65 * 512
    assert image[root : root + 12] == b"CIDATA     \x08"
    assert volume_label(bytes(512)) is None


def test_fat_long_names_and_short_names() -> None:
    shorts = _short_names(["user-data", "meta-data", "network-config", "network-configs"])
    assert shorts == [b"USER-D~1   ", b"META-D~1   ", b"NETWOR~1   ", b"NETWOR~2   "]
    image = build_fat([FatFile("network-config", b"v")], 1 * MiB, when=WHEN)
    lay = layout(1 * MiB)
    root = image[lay.root_start * 512 :][: 4 * 32]
    # label, then two long-name entries (last part first), then the short entry
    assert root[32] == 0x42 and root[64] == 0x01 and root[32 + 11] == root[64 + 11] == 0x0F
    assert root[32 + 13] == root[64 + 13] == _checksum(b"NETWOR~1   ")
    name = b"".join(e[1:11] + e[14:26] + e[28:32] for e in (root[64:96], root[32:64]))
    assert name.decode("utf-16-le").split("\0")[0] == "network-config"
    assert root[96:107] == b"NETWOR~1   " and struct.unpack_from("<HI", root, 96 + 26) == (2, 1)


def test_fat_files_too_large() -> None:
    with pytest.raises(SeedTooLarge, match="do not fit"):
        build_fat([FatFile("user-data", bytes(2 * MiB))], 1 * MiB, when=WHEN)


def test_seed_content_defaults_meta_data() -> None:
    seed = SeedContent.from_cloud_init(CloudInit(user_data="#cloud-config\n"), "job-7", "node1")
    assert seed.meta_data == 'instance-id: "job-7"\nlocal-hostname: "node1"\n'
    assert [f.name for f in seed.files()] == ["user-data", "meta-data"]
    given_meta = SeedContent.from_cloud_init(CloudInit(meta_data="instance-id: a\n", network_config="v"), "j")
    assert given_meta.meta_data == "instance-id: a\n"
    assert [f.name for f in given_meta.files()] == ["user-data", "meta-data", "network-config"]
    assert SeedContent.from_cloud_init(CloudInit(), "j").meta_data == 'instance-id: "j"\n'
