"""agent.disk.efiboot: EFI_LOAD_OPTION bytes laid out as UEFI 2.10 3.1.3 and 10.3 say, and where a
new entry goes in BootOrder (the network stays first)."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from agent.disk.efiboot import (
    GLOBAL_VARIABLE,
    LOAD_OPTION_ACTIVE,
    EfiBootError,
    LoaderPath,
    LoadOption,
    decode_boot_order,
    decode_load_option,
    device_path,
    efi_path,
    encode_boot_order,
    encode_load_option,
    plan_entry,
)
from agent.runtime.efivars import EfiVarsError, add_boot_entry

GUID = uuid.UUID("5e1d6e00-0000-4000-8000-000000000002")
LOADER = LoaderPath(2, GUID, 4096, 65536, "/EFI/debian/grubx64.efi")


def test_device_path_fields_sit_where_the_spec_puts_them() -> None:
    dp = device_path(LOADER)
    # Hard drive media node: type 4, subtype 1, length 42.
    assert dp[0:4] == bytes([4, 1, 42, 0])
    number, start, size = struct.unpack_from("<IQQ", dp, 4)
    assert (number, start, size) == (2, 4096, 65536)
    assert uuid.UUID(bytes_le=dp[24:40]) == GUID
    assert dp[40:42] == bytes([2, 2])  # GPT, GUID signature
    # File path node: type 4, subtype 4, then the UCS-2 path with its NUL.
    name = "\\EFI\\debian\\grubx64.efi\0".encode("utf-16-le")
    assert dp[42:44] == bytes([4, 4]) and struct.unpack_from("<H", dp, 44)[0] == 4 + len(name)
    assert dp[46 : 46 + len(name)] == name
    assert dp[46 + len(name) :] == bytes([0x7F, 0xFF, 4, 0])  # End of entire device path


def test_load_option_layout_and_round_trip() -> None:
    dp = device_path(LOADER)
    raw = encode_load_option(LoadOption(LOAD_OPTION_ACTIVE, "debian (sledge)", dp))
    assert struct.unpack_from("<IH", raw) == (1, len(dp))
    desc = "debian (sledge)\0".encode("utf-16-le")
    assert raw[6 : 6 + len(desc)] == desc and raw[6 + len(desc) :] == dp
    back = decode_load_option(raw + b"opt")
    assert back == LoadOption(1, "debian (sledge)", dp, b"opt")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\1\0\0\0\4", b"\1\0\0\0\0\0a\0b\0", b"\1\0\0\0\xff\0a\0\0\0\1\2"],
    ids=["empty", "short", "no-nul", "path-past-end"],
)
def test_damaged_load_options_are_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(EfiBootError, match="load option"):
        decode_load_option(raw)


def test_paths_are_rooted_with_backslashes_and_bounded() -> None:
    assert efi_path("EFI/debian/grubx64.efi") == "\\EFI\\debian\\grubx64.efi"
    assert efi_path("\\EFI\\BOOT\\BOOTX64.EFI") == "\\EFI\\BOOT\\BOOTX64.EFI"
    for bad in ("EFI//x", "EFI/dir/", "a\0b", "x" * 600):
        with pytest.raises(EfiBootError, match="expected a file path"):
            efi_path(bad)


def test_boot_order_codec() -> None:
    assert decode_boot_order(encode_boot_order([1, 0x10, 0xABCD])) == [1, 0x10, 0xABCD]
    with pytest.raises(EfiBootError, match="even length"):
        decode_boot_order(b"\1\0\2")


def network(n: int) -> bytes:
    mac = struct.pack("<BBH", 3, 11, 37) + bytes(33)  # MAC address messaging node
    return encode_load_option(LoadOption(1, f"UEFI PXEv4 {n}", mac + bytes([0x7F, 0xFF, 4, 0])))


def test_new_entry_goes_right_after_the_entry_the_machine_booted_from() -> None:
    entries = {0: network(0), 1: network(1), 3: b"junk"}
    plan = plan_entry(LOADER, "debian", entries, [1, 0, 3], current=1)
    assert plan.number == 2 and not plan.reused and plan.name == "Boot0002"
    assert plan.order == (1, 2, 0, 3)
    assert decode_load_option(plan.option).device_path == device_path(LOADER)


def test_without_boot_current_in_the_order_the_first_entry_stays_first() -> None:
    plan = plan_entry(LOADER, "debian", {0: network(0), 1: network(1)}, [0, 1], current=7)
    assert plan.order == (0, 2, 1)
    assert plan_entry(LOADER, "debian", {}, [], current=None).order == (0,)


def test_a_redeploy_reuses_its_entry_and_moves_it_back_after_the_network() -> None:
    first = plan_entry(LOADER, "debian", {0: network(0)}, [0], current=0)
    entries = {0: network(0), first.number: first.option, 5: network(5)}
    again = plan_entry(LOADER, "debian v2", entries, [5, 0, first.number, first.number], current=5)
    assert again.reused and again.number == first.number
    assert again.order == (5, first.number, 0)  # duplicates gone, network first


def test_an_entry_for_another_partition_is_not_reused() -> None:
    other = LoaderPath(1, GUID, 4096, 65536, LOADER.path)
    entries = {0: encode_load_option(LoadOption(1, "x", device_path(other)))}
    plan = plan_entry(LOADER, "debian", entries, [0], current=0)
    assert not plan.reused and plan.number == 1


def test_bad_extents_are_refused() -> None:
    with pytest.raises(EfiBootError, match="partition 0"):
        device_path(LoaderPath(0, GUID, 1, 1, "x.efi"))
    with pytest.raises(EfiBootError, match="non-empty extent"):
        device_path(LoaderPath(1, GUID, 1, 0, "x.efi"))


def efivar(root: Path, name: str, value: bytes) -> None:
    (root / f"{name}-{GLOBAL_VARIABLE}").write_bytes(struct.pack("<I", 7) + value)


def test_add_boot_entry_writes_the_variables_efivarfs_style(tmp_path: Path) -> None:
    efivar(tmp_path, "Boot0000", network(0))
    efivar(tmp_path, "Boot0001", network(1))
    efivar(tmp_path, "BootOrder", encode_boot_order([1, 0]))
    efivar(tmp_path, "BootCurrent", struct.pack("<H", 1))
    report = add_boot_entry(LOADER, "debian", tmp_path)
    assert report.name == "Boot0002" and report.order == (1, 2, 0) and not report.reused
    raw = (tmp_path / f"Boot0002-{GLOBAL_VARIABLE}").read_bytes()
    assert raw[:4] == struct.pack("<I", 7)  # NV | BS | RT
    assert decode_load_option(raw[4:]).device_path == device_path(LOADER)
    order = (tmp_path / f"BootOrder-{GLOBAL_VARIABLE}").read_bytes()[4:]
    assert decode_boot_order(order) == [1, 2, 0]
    again = add_boot_entry(LOADER, "debian", tmp_path)
    assert again.reused and again.order == (1, 2, 0)
    assert "Boot0002" in again.describe() and "0001,0002,0000" in again.describe()


def test_add_boot_entry_without_efivarfs_says_so(tmp_path: Path) -> None:
    with pytest.raises(EfiVarsError, match="not a directory"):
        add_boot_entry(LOADER, "debian", tmp_path / "absent")
