"""Root device hints: Ironic's meaning, table-driven, plus where sledge goes further."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.hardware.hints import (
    HINT_NAMES,
    AmbiguousDisks,
    HintError,
    NoMatchingDisk,
    SelectionError,
    first_mismatch,
    parse_hints,
    refusal,
    select_disk,
)
from agent.hardware.model import Disk, Partition

GiB = 1 << 30


def disk(name: str, size: int, **kw: Any) -> Disk:
    fields: dict[str, Any] = dict(
        name=name,
        path=f"/dev/{name}",
        kind="disk",
        size=size,
        model=None,
        vendor=None,
        serial=None,
        wwn=None,
        wwn_with_extension=None,
        wwn_vendor_extension=None,
        rotational=False,
        removable=False,
        read_only=False,
        logical_sector_size=512,
        physical_sector_size=512,
        tran=None,
        hctl=None,
        by_path=(),
        by_id=(),
        partitions=(),
        holders=(),
        mounts=(),
        holds_root=False,
    )
    fields.update(kw)
    return Disk(**fields)


NVME_MODEL = "Dell Ent NVMe P5600 MU U.2 1.6TB"
DISKS = (
    disk(
        "sda",
        480103981056,
        model="SAMSUNG MZ7LH480",
        vendor="ATA",
        serial="S45PNA0M123456",
        wwn="0x5002538e40a1b2c3",
        wwn_with_extension="0x5002538e40a1b2c3",
        hctl="0:0:0:0",
        tran="sata",
        by_path=("/dev/disk/by-path/pci-0000:00:17.0-ata-1", "/dev/disk/by-path/pci-0000:00:17.0-ata-1.0"),
        by_id=(
            "/dev/disk/by-id/ata-SAMSUNG_MZ7LH480_S45PNA0M123456",
            "/dev/disk/by-id/wwn-0x5002538e40a1b2c3",
        ),
    ),
    disk(
        "sdb",
        4000787030016,
        model="ST4000NM0025",
        vendor="SEAGATE",
        serial="ZC1A2B3C",
        rotational=True,
        wwn="0x5000c500a1b2c3d4",
        wwn_with_extension="0x5000c500a1b2c3d4",
        hctl="2:0:0:0",
        tran="sas",
        by_path=("/dev/disk/by-path/pci-0000:18:00.0-sas-0x5000c500a1b2c3d5-lun-0",),
    ),
    disk(
        "sdc",
        959656755200,
        model="LOGICAL VOLUME",
        vendor="HPE",
        wwn="0x600508b1001c7f1d",
        wwn_with_extension="0x600508b1001c7f1d2a3b4c5d6e7f8091",
        wwn_vendor_extension="0x2a3b4c5d6e7f8091",
        hctl="3:2:0:0",
        tran="sas",
    ),
    disk(
        "sdd", 100 * GiB, model="Virtual Disk", vendor="Msft", serial="EXACT100", hctl="4:0:0:0", tran="sas"
    ),
    disk(
        "nvme0n1",
        1600321314816,
        model=NVME_MODEL,
        serial="PHAB1234567812ABC",
        tran="nvme",
        wwn="eui.01000000000000005cd2e4a1b2c3d4e0",
    ),
    disk(
        "nvme1n1",
        1600321314816,
        model=NVME_MODEL,
        serial="PHAB1234567812ABD",
        tran="nvme",
        wwn="eui.01000000000000005cd2e4a1b2c3d4e1",
    ),
    disk(
        "sde",
        30752636928,
        model="Ultra",
        vendor="SanDisk",
        serial="4C530001230415117362",
        removable=True,
        rotational=True,
        tran="usb",
        hctl="6:0:0:0",
    ),
    disk("mmcblk0", 63864569856, serial="0x1234abcd", tran="mmc"),
    disk(
        "sdf",
        500107862016,
        model="WDC WD5000",
        vendor="ATA",
        serial="ROOTDISK",
        tran="sata",
        rotational=True,
        holds_root=True,
        mounts=("/boot/efi", "/"),
        partitions=(Partition("sdf1", 1, 1 << 20, 1 << 29, (), ("/boot/efi",)),),
    ),
    disk(
        "sdg",
        1000204886016,
        model="WDC WD10EZEX",
        vendor="ATA",
        serial="DATADISK",
        tran="sata",
        mounts=("/data",),
    ),
    disk("sdh", 200 * GiB, model="Read Only", serial="READONLY", tran="sas", read_only=True),
    disk(
        "sdi",
        300 * GiB,
        model="LVM member",
        serial="BUSYDISK",
        tran="sas",
        partitions=(Partition("sdi1", 1, 1 << 20, 299 * GiB, ("dm-3",), ()),),
    ),
    disk("loop0", 1 * GiB, kind="loop", rotational=True),
    disk("sr0", 0, kind="rom", model="DVD+-RW DU-8A5LH", tran="sata", removable=True),
)


# (hints, the disk chosen, or the error class)
CASES: list[tuple[dict[str, Any] | None, str | type[Exception]]] = [
    # plain values mean s== (strings) and == (size), compared case-insensitively after trimming
    ({"serial": "S45PNA0M123456"}, "sda"),
    ({"serial": "s45pna0m123456"}, "sda"),
    ({"serial": "  S45PNA0M123456 \t"}, "sda"),
    ({"serial": "s== S45PNA0M123456"}, "sda"),
    ({"serial": "S==S45PNA0M123456"}, "sda"),  # operators need no space after them, as in Ironic
    ({"wwn": "0x5002538E40A1B2C3"}, "sda"),
    ({"wwn_with_extension": "0x600508b1001c7f1d2a3b4c5d6e7f8091"}, "sdc"),
    ({"wwn_vendor_extension": "0x2a3b4c5d6e7f8091"}, "sdc"),
    ({"model": "SAMSUNG MZ7LH480"}, "sda"),  # inner spaces are part of the value
    ({"model": "samsung  mz7lh480"}, NoMatchingDisk),  # ...and are not squeezed
    ({"vendor": "ata"}, "sda"),  # sdf and sdg are ATA too, but can never be chosen
    ({"hctl": "2:0:0:0"}, "sdb"),
    ({"tran": "nvme", "serial": "PHAB1234567812ABD"}, "nvme1n1"),
    ({"model": "<in> p5600", "serial": "PHAB1234567812ABD"}, "nvme1n1"),
    ({"model": "<in> p5600"}, AmbiguousDisks),  # Ironic would take the first
    ({"serial": "<in> 1234567812"}, AmbiguousDisks),
    ({"vendor": "<or> seagate <or> hpe", "rotational": True}, "sdb"),
    ({"vendor": "<OR> Seagate <or> HPE", "rotational": False}, "sdc"),
    ({"vendor": "<or> seagate <or> hpe <or>", "rotational": True}, "sdb"),
    ({"vendor": "<or> seagate <or> <or>", "rotational": True}, "sdb"),
    ({"serial": "<or> PHAB1234567812ABC <or> nothing"}, "nvme0n1"),
    ({"serial": "s!= PHAB1234567812ABC", "tran": "nvme"}, "nvme1n1"),
    ({"serial": "s!= anything", "hctl": "3:2:0:0"}, NoMatchingDisk),  # sdc has no serial: no match
    ({"model": "s< m", "tran": "sas"}, "sdc"),  # "logical volume" < "m"
    ({"model": "s>= virtual", "tran": "sas"}, "sdd"),
    ({"model": "s<= st4000nm0025", "tran": "sas", "rotational": True}, "sdb"),
    # size: GiB, compared with the exact byte count, never rounded
    ({"size": 100}, "sdd"),
    ({"size": "100"}, "sdd"),
    ({"size": "== 100"}, "sdd"),
    ({"size": 447}, NoMatchingDisk),  # sda is 447.13 GiB
    ({"size": ">= 447", "tran": "sata"}, "sda"),
    ({"size": ">=447", "tran": "sata"}, "sda"),
    ({"size": "= 447", "tran": "sata"}, "sda"),  # '=' means >= (oslo specs_matcher)
    ({"size": "= 448", "tran": "sata"}, NoMatchingDisk),
    ({"size": "<= 447", "tran": "sata"}, NoMatchingDisk),
    ({"size": "< 448", "tran": "sata"}, "sda"),
    ({"size": "> 447", "tran": "sata"}, "sda"),
    ({"size": "!= 100", "tran": "sas", "rotational": False}, "sdc"),
    ({"size": "<or> 100 <or> 200"}, "sdd"),
    ({"size": "<or> 100 <or> 200 <or>"}, "sdd"),  # a trailing <or>, as Ironic's tests write it
    ({"size": "<range-in> [ 440 450 ]"}, "sda"),
    ({"size": "<range-in> [100 101)"}, "sdd"),
    ({"size": "<range-in> ( 100 447 ]"}, NoMatchingDisk),
    ({"size": "<range-in> [ 447.1 447.2 ]"}, "sda"),
    # rotational: booleans and strutils' strings
    ({"rotational": True, "tran": "sas"}, "sdb"),
    ({"rotational": "yes", "tran": "sas"}, "sdb"),
    ({"rotational": "ON", "tran": "sas"}, "sdb"),
    ({"rotational": 1, "tran": "sas"}, "sdb"),
    ({"rotational": "f", "tran": "sas", "vendor": "hpe"}, "sdc"),
    ({"rotational": True}, AmbiguousDisks),  # sdb and the USB stick
    # name, with or without /dev/, and case as Ironic (lowercased)
    ({"name": "/dev/sdb"}, "sdb"),
    ({"name": "sdb"}, "sdb"),
    ({"name": "SDB"}, "sdb"),
    ({"name": "<in> nvme1"}, "nvme1n1"),
    ({"name": "<or> sdb <or> /dev/sdc", "rotational": False}, "sdc"),
    # every by-path link counts; by_id is ours; both accept a bare link name
    ({"by_path": "/dev/disk/by-path/pci-0000:00:17.0-ata-1.0"}, "sda"),
    ({"by_path": "pci-0000:00:17.0-ata-1"}, "sda"),
    ({"by_path": "<in> sas-0x5000c500a1b2c3d5"}, "sdb"),
    ({"by_id": "wwn-0x5002538e40a1b2c3"}, "sda"),
    ({"by_id": "/dev/disk/by-id/ata-SAMSUNG_MZ7LH480_S45PNA0M123456"}, "sda"),
    # hints may name what the default never picks...
    ({"tran": "usb"}, "sde"),
    ({"tran": "mmc"}, "mmcblk0"),
    ({"name": "loop0"}, "loop0"),
    # ...but never a disk in use or unwritable
    ({"serial": "ROOTDISK"}, NoMatchingDisk),
    ({"serial": "DATADISK"}, NoMatchingDisk),
    ({"serial": "READONLY"}, NoMatchingDisk),
    ({"serial": "BUSYDISK"}, NoMatchingDisk),
    ({"model": "<in> dvd"}, NoMatchingDisk),  # sr0 holds no medium
    # no hints: the smallest internal, fixed, writable, unused disk of at least 4 GiB
    (None, "sdd"),
    ({}, "sdd"),
]


@pytest.mark.parametrize(("hints", "expected"), CASES, ids=[repr(h) for h, _ in CASES])
def test_hint_table(hints: dict[str, Any] | None, expected: str | type[Exception]) -> None:
    if isinstance(expected, str):
        assert select_disk(DISKS, hints).name == expected
    else:
        with pytest.raises(expected):
            select_disk(DISKS, hints)


INVALID: list[tuple[object, str]] = [
    ({"nme": "sda"}, "nme"),
    ({"size": "big"}, "size"),
    ({"size": 1.5}, "size"),
    ({"size": "1.5"}, "size"),
    ({"size": True}, "size"),
    ({"size": 0}, "size"),
    ({"size": -1}, "size"),
    ({"size": "> 0"}, "size"),
    ({"size": ""}, "size"),
    ({"size": ">="}, "size"),
    ({"size": "s== 10"}, "size"),
    ({"size": "<in> 10"}, "size"),
    ({"size": "<range-in> (10)"}, "size"),
    ({"size": "<range-in> ( 20 10 )"}, "size"),
    ({"size": "<range-in> { 1 2 }"}, "size"),
    ({"size": None}, "size"),
    ({"size": [10]}, "size"),
    ({"serial": 12345}, "serial"),
    ({"serial": ""}, "serial"),
    ({"serial": "   "}, "serial"),
    ({"serial": "s=="}, "serial"),
    ({"serial": "== 5"}, "serial"),
    ({"serial": ">= a"}, "serial"),
    ({"serial": "= a"}, "serial"),
    ({"serial": "<all-in> a b"}, "serial"),
    ({"serial": "<range-in> [ 1 2 ]"}, "serial"),
    ({"serial": "<or>"}, "serial"),
    ({"serial": "<or> a <or> <or> b"}, "serial"),
    ({"serial": "<or> <or> b"}, "serial"),
    ({"size": "<or> 10 <or> <or> 20"}, "size"),
    ({"model": None}, "model"),
    ({"by_path": ["a", "b"]}, "by_path"),
    ({"rotational": "maybe"}, "rotational"),
    ({"rotational": 2}, "rotational"),
    ({"rotational": None}, "rotational"),
    ({"rotational": 1.0}, "rotational"),
    ({"rotational": "== true"}, "rotational"),
    ("serial=abc", "(hints)"),
    ([{"serial": "abc"}], "(hints)"),
]


@pytest.mark.parametrize(("hints", "name"), INVALID, ids=[repr(h) for h, _ in INVALID])
def test_invalid_hints_name_the_hint(hints: object, name: str) -> None:
    with pytest.raises(HintError) as info:
        parse_hints(hints)
    assert info.value.hint == name
    assert repr(name) in str(info.value) and "expected" in str(info.value)


class Untouchable(Sequence[Disk]):
    """Fails the test if selection looks at any disk."""

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("disks were looked at before the hints were validated")

    def __len__(self) -> int:
        raise AssertionError("disks were looked at before the hints were validated")

    def __iter__(self) -> Iterator[Disk]:
        raise AssertionError("disks were looked at before the hints were validated")


def test_invalid_hint_is_refused_before_any_disk_is_looked_at() -> None:
    with pytest.raises(HintError, match="'size'"):
        select_disk(Untouchable(), {"serial": "ok", "size": "huge"})


def test_no_match_lists_every_disk_with_why() -> None:
    with pytest.raises(NoMatchingDisk) as info:
        select_disk(DISKS, {"serial": "ROOTDISK"})
    text = str(info.value)
    assert "no usable disk matches the root device hints (serial s== 'rootdisk')" in text
    assert "/dev/sdf" in text and "refused: holds the running system (/)" in text
    assert "/dev/sdg" in text and "refused: mounted (/data)" in text
    assert "refused: in use by dm-3" in text and "refused: read-only" in text
    assert "serial=S45PNA0M123456" in text and "does not match serial s== 'rootdisk'" in text
    assert len(info.value.candidates) == len(DISKS)


def test_ambiguity_lists_the_candidates() -> None:
    with pytest.raises(AmbiguousDisks) as info:
        select_disk(DISKS, {"model": "<in> p5600"})
    assert [c.disk.name for c in info.value.candidates] == ["nvme0n1", "nvme1n1"]
    assert "serial=PHAB1234567812ABC" in str(info.value) and "serial=PHAB1234567812ABD" in str(info.value)
    assert "2 disks match" in str(info.value)


DEFAULT_CASES: list[tuple[tuple[Disk, ...], str | type[Exception], str]] = [
    ((disk("sda", 8 * GiB), disk("sdb", 16 * GiB)), "sda", ""),
    ((disk("sda", 3 * GiB), disk("sdb", 16 * GiB)), "sdb", ""),
    ((disk("sda", 4 * GiB), disk("sdb", 16 * GiB)), "sda", ""),  # 4 GiB counts
    ((disk("sda", 4 * GiB - 512),), NoMatchingDisk, "smaller than 4 GiB"),
    ((disk("sda", 8 * GiB, removable=True),), NoMatchingDisk, "removable"),
    ((disk("sda", 8 * GiB, tran="usb"),), NoMatchingDisk, "USB"),  # a fixed USB disk too
    ((disk("mmcblk0", 8 * GiB),), NoMatchingDisk, "SD/MMC"),
    ((disk("sda", 8 * GiB, tran="mmc"),), NoMatchingDisk, "SD/MMC"),
    ((disk("loop0", 8 * GiB, kind="loop"),), NoMatchingDisk, "loop device"),
    ((disk("zram0", 8 * GiB, kind="zram"),), NoMatchingDisk, "zram device"),
    ((disk("ram0", 8 * GiB, kind="ram"),), NoMatchingDisk, "ram device"),
    ((disk("sr0", 8 * GiB, kind="rom"),), NoMatchingDisk, "rom device"),
    ((disk("sr0", 8 * GiB, kind="rom"), disk("sda", 8 * GiB)), "sda", ""),
    ((disk("sda", 8 * GiB, read_only=True),), NoMatchingDisk, "read-only"),
    ((disk("sda", 8 * GiB, holds_root=True, mounts=("/",)),), NoMatchingDisk, "running system"),
    ((disk("sda", 8 * GiB, mounts=("[SWAP]",)),), NoMatchingDisk, r"mounted \(\[SWAP\]\)"),
    ((disk("sda", 8 * GiB, holders=("md0",)), disk("md0", 8 * GiB, kind="md")), "md0", ""),
    ((disk("sda", 8 * GiB, serial="A"), disk("sdb", 8 * GiB, serial="B")), AmbiguousDisks, "tie"),
    ((disk("sda", 8 * GiB), disk("sdb", 8 * GiB, removable=True)), "sda", ""),
    ((), NoMatchingDisk, "no disk qualifies"),
]


@pytest.mark.parametrize(("disks", "expected", "reason"), DEFAULT_CASES)
def test_default_choice(disks: tuple[Disk, ...], expected: str | type[Exception], reason: str) -> None:
    if isinstance(expected, str):
        assert select_disk(disks).name == expected
    else:
        with pytest.raises(expected, match=reason):
            select_disk(disks)


def test_refusal_reasons() -> None:
    assert refusal(DISKS[0]) is None
    assert refusal(disk("x", 0)) == "refused: empty (no medium or not attached)"


# A writable ROM device with a medium (a DVD-RAM) matches these hints, and is still never chosen:
# Ironic never lists ROM devices. sr* is a SCSI CD/DVD drive whatever kind the inventory gave it.
WRITABLE_ROMS = [
    (disk("sr0", 8 * GiB, kind="rom", serial="DVDRAM1", tran="sata"), {"serial": "DVDRAM1"}),
    (disk("sr0", 8 * GiB, kind="rom", serial="DVDRAM1", tran="sata"), {"name": "sr0"}),
    (disk("sr1", 8 * GiB, kind="disk", serial="DVDRAM2"), {"serial": "DVDRAM2"}),
    (disk("vdz", 8 * GiB, kind="rom", serial="ROM3"), {"size": "8"}),
]


@pytest.mark.parametrize(("rom", "hints"), WRITABLE_ROMS, ids=[r.name + str(h) for r, h in WRITABLE_ROMS])
def test_a_rom_device_is_never_a_candidate(rom: Disk, hints: dict[str, str]) -> None:
    assert not rom.read_only and rom.size > 0 and first_mismatch(parse_hints(hints), rom) is None
    assert refusal(rom) == "refused: a rom device (CD/DVD drive)"
    with pytest.raises(NoMatchingDisk, match="rom device"):
        select_disk((rom,), hints)
    plain = dataclasses.replace(rom, name="sdq", path="/dev/sdq", kind="disk")
    assert select_disk((rom, plain), {"size": "8"}) == plain


# -- properties ----------------------------------------------------------------------------------

hint_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["<or>", "<in>", "s==", "==", "=", "<range-in>", "<all-in>", "<or> a <or>", "s< x", ">= 1"]
    ),
    st.integers(min_value=-5, max_value=1 << 40),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
hint_names = st.one_of(st.sampled_from(HINT_NAMES), st.text(max_size=12))


@given(st.dictionaries(hint_names, hint_values, max_size=4))
def test_parse_only_ever_raises_hint_error(raw: dict[str, object]) -> None:
    try:
        hints = parse_hints(raw)
    except HintError as e:
        assert e.hint in raw or e.hint == "(hints)"
        return
    assert len(hints) == len(raw)


@given(st.dictionaries(st.sampled_from(HINT_NAMES), hint_values, max_size=3))
def test_selection_returns_a_usable_matching_disk_or_a_typed_error(raw: dict[str, object]) -> None:
    try:
        chosen = select_disk(DISKS, raw)
    except (HintError, SelectionError):
        return
    assert refusal(chosen) is None
    assert first_mismatch(parse_hints(raw), chosen) is None


serials = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=20).filter(
    lambda s: not s.lower().startswith(("s=", "s!", "s<", "s>"))
)


@given(serials, st.sampled_from([str.upper, str.lower, str.swapcase]), st.text(" \t", max_size=3))
def test_string_hints_ignore_case_and_surrounding_space(serial: str, case: Any, pad: str) -> None:
    disks = [disk("sda", 8 * GiB, serial=serial), disk("sdb", 8 * GiB, serial=serial + "x")]
    assert select_disk(disks, {"serial": pad + case(serial) + pad}).name == "sda"


@given(st.integers(min_value=1, max_value=1 << 44), st.integers(min_value=1, max_value=1 << 14))
def test_size_is_compared_unrounded(size: int, gib: int) -> None:
    d = [disk("sda", size)]
    for op, holds in (("==", size == gib * GiB), (">=", size >= gib * GiB), ("<", size < gib * GiB)):
        hints = parse_hints({"size": f"{op} {gib}"})
        assert (first_mismatch(hints, d[0]) is None) == holds


@st.composite
def hints_from_a_usable_disk(draw: st.DrawFn) -> tuple[Disk, dict[str, str]]:
    """A usable disk and 1-4 hints written from its own inventory, as an operator would copy them
    (the random hints above almost never match a disk: this is the property's matching half)."""
    source = draw(st.sampled_from([d for d in DISKS if refusal(d) is None]))
    hints: dict[str, str] = {}
    for name in draw(st.lists(st.sampled_from(HINT_NAMES), min_size=1, max_size=4, unique=True)):
        if name == "size":
            low, high = source.size // GiB, -(-source.size // GiB)
            hints[name] = draw(st.sampled_from([f">= {low}", f"<= {high}", f">={low}"]))
        elif name == "rotational":
            hints[name] = draw(st.sampled_from(["true", "1", "yes"] if source.rotational else ["false", "0"]))
        else:
            prefix = {"name": "/dev/", "by_path": "/dev/disk/by-path/", "by_id": "/dev/disk/by-id/"}.get(name)
            links = getattr(source, name) if name in ("by_path", "by_id") else (getattr(source, name),)
            if name == "name":
                links = (source.path,)
            values = [v for v in links if v]
            if not values:
                continue  # the disk has no such value to copy
            value = draw(st.sampled_from(values))
            if prefix and draw(st.booleans()):
                value = value.removeprefix(prefix)  # relative, as Ironic allows for these
            # string hints ignore case (test above); paths are compared as written
            hints[name] = value if prefix else draw(st.sampled_from([value, value.upper(), value.lower()]))
    return source, hints or {"name": source.path}  # no hints at all would be the default choice


@given(hints_from_a_usable_disk())
def test_hints_copied_from_a_usable_disk_select_it_or_say_which_others_match(
    case: tuple[Disk, dict[str, str]],
) -> None:
    source, hints = case
    parsed = parse_hints(hints)
    assert first_mismatch(parsed, source) is None, hints
    matching = [d for d in DISKS if refusal(d) is None and first_mismatch(parsed, d) is None]
    if len(matching) == 1:
        assert select_disk(DISKS, hints) == source
    else:
        with pytest.raises(AmbiguousDisks):
            select_disk(DISKS, hints)
