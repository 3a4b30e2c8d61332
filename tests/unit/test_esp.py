"""agent.disk.fatdir and efiboot.esp_verdict on real filesystems: GPT disks made with sgdisk, FATs
made with mkfs.vfat and filled with mtools, as an image's ESP is. Damaged bytes are an error with a
reason, never a traceback."""

from __future__ import annotations

import random
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from agent import protocol as p
from agent.disk.efiboot import (
    GLOBAL_VARIABLE,
    LoadOption,
    decode_boot_order,
    decode_load_option,
    encode_boot_order,
    encode_load_option,
    esp_verdict,
)
from agent.disk.fatdir import Fat, FatError
from agent.disk.tables import read_tables
from agent.runtime.jobs.deploy import deploy
from tests.jobkit import fake_disk, rig
from tests.stores import import_store
from tests.tools import need

MiB = 1 << 20
ESP_GUID = uuid.UUID("5e1d6e00-0000-4000-8000-000000000002")


def fat_image(path: Path, size_mib: int, bits: int, files: list[str]) -> Path:
    need("mkfs.vfat", "mcopy", "mmd")
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkfs.vfat", "-F", str(bits), "-n", "ESP", str(path)], check=True, capture_output=True)
    src = path.parent / "src"
    for name in files:
        dirs = name.split("/")[:-1]
        for i in range(1, len(dirs) + 1):
            subprocess.run(
                ["mmd", "-D", "s", "-i", str(path), "::/" + "/".join(dirs[:i])], capture_output=True
            )
        src.write_bytes(name.encode())
        subprocess.run(["mcopy", "-o", "-i", str(path), str(src), "::/" + name], check=True)
    return path


def disk(tmp_path: Path, files: list[str], esp: bool = True) -> Path:
    need("sgdisk")
    fat = fat_image(tmp_path / "esp.fat", 33, 32, files) if esp else None
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    kind = "ef00" if esp else "8300"
    subprocess.run(
        ["sgdisk", "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:4096:+33M", "-t", f"2:{kind}",
         "-u", f"2:{ESP_GUID}", str(img)],
        check=True, capture_output=True,
    )  # fmt: skip
    if fat is not None:
        with open(img, "r+b") as out:
            out.seek(4096 * 512)
            out.write(fat.read_bytes())
    return img


def verdict(img: Path):  # type: ignore[no-untyped-def]
    data = img.read_bytes()

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return esp_verdict(read_tables(read, len(data), 512), read)


@pytest.mark.parametrize(("size", "bits"), [(1, 12), (16, 16), (40, 32)])
def test_fat_lookups_on_each_fat_width(tmp_path: Path, size: int, bits: int) -> None:
    img = fat_image(tmp_path / "fat.img", size, bits, ["EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi"])
    data = img.read_bytes()
    fat = Fat.open(lambda o, n: data[o : o + n], len(data))
    assert fat.bits == bits
    assert fat.exists("EFI/BOOT/BOOTX64.EFI") and fat.exists("\\efi\\Debian\\GRUBX64.efi")
    assert not fat.exists("EFI/BOOT/grubx64.efi") and not fat.exists("EFI/none/x.efi")
    assert not fat.exists("EFI/BOOT")  # a directory is not a file
    assert sorted(e.name for e in fat.listdir("EFI")) == ["BOOT", "DEBIAN"]
    with pytest.raises(FatError, match="no directory 'nope'"):
        fat.listdir("EFI/nope")


def test_an_esp_with_the_removable_loader_needs_no_entry(tmp_path: Path) -> None:
    v = verdict(disk(tmp_path, ["EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi"]))
    assert v.loader is None and "removable-media loader" in v.detail


def test_an_esp_without_it_gets_an_entry_for_its_vendor_loader_shim_first(tmp_path: Path) -> None:
    v = verdict(disk(tmp_path, ["EFI/debian/grubx64.efi", "EFI/debian/shimx64.efi"]))
    assert v.loader is not None, v.detail
    assert (v.loader.partition, v.loader.partition_guid) == (2, ESP_GUID)
    assert (v.loader.start, v.loader.sectors) == (4096, 33 * 2048)
    assert v.loader.path == "EFI/DEBIAN/SHIMX64.EFI"


def test_no_esp_or_no_loader_is_said(tmp_path: Path) -> None:
    assert verdict(disk(tmp_path, [], esp=False)).detail == "no EFI system partition"
    (tmp_path / "b").mkdir()
    v = verdict(disk(tmp_path / "b", ["EFI/tools/shell.efi"]))
    assert v.loader is None and "no EFI/<vendor>/shimx64.efi or grubx64.efi" in v.detail


def test_damaged_fats_give_reasons_not_tracebacks(tmp_path: Path) -> None:
    good = fat_image(tmp_path / "fat.img", 16, 16, ["EFI/debian/grubx64.efi"]).read_bytes()
    rng = random.Random(13)
    outcomes = set()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 40)):
            at = rng.randrange(0, 64 * 1024)  # boot sector, FATs and the root directory
            data[at] = rng.randrange(256)
        raw = bytes(data)
        try:
            fat = Fat.open(lambda o, n, raw=raw: raw[o : o + n], len(raw))
            outcomes.add(fat.exists("EFI/debian/grubx64.efi"))
            fat.listdir("EFI")
        except FatError as exc:
            outcomes.add(str(exc).split(":")[0])
    assert len(outcomes) > 1
    with pytest.raises(FatError, match="55aa"):
        Fat.open(lambda o, n: bytes(n), 1 << 20)


def efi_dir(tmp_path: Path) -> Path:
    efivars = tmp_path / "efi" / "efivars"
    efivars.mkdir(parents=True)
    for name, value in (
        ("Boot0000", encode_load_option(LoadOption(1, "UEFI PXEv4", bytes([0x7F, 0xFF, 4, 0])))),
        ("BootOrder", encode_boot_order([0])),
        ("BootCurrent", struct.pack("<H", 0)),
    ):
        (efivars / f"{name}-{GLOBAL_VARIABLE}").write_bytes(struct.pack("<I", 7) + value)
    return efivars.parent


@pytest.mark.parametrize("removable", [False, True])
def test_deploy_on_a_uefi_machine_adds_the_entry_its_image_needs(tmp_path: Path, removable: bool) -> None:
    files = ["EFI/debian/grubx64.efi"] + (["EFI/BOOT/BOOTX64.EFI"] if removable else [])
    image = disk(tmp_path, files)
    _, _, digest = import_store(tmp_path / "store", image)
    efi = efi_dir(tmp_path)
    params = p.JobParams(manifest_digest=digest, image_name="debian", image_version="12")
    r = rig(tmp_path, [fake_disk("vda")], p.JobKind.DEPLOY, params, tmp_path / "store", efi=efi)
    outcome = deploy(r.ctx)
    assert outcome.result.outcome is p.Outcome.SUCCEEDED, outcome.result.message
    order = decode_boot_order((efi / "efivars" / f"BootOrder-{GLOBAL_VARIABLE}").read_bytes()[4:])
    if removable:
        assert "no UEFI boot entry needed" in outcome.result.message
        assert order == [0]
    else:
        assert "UEFI boot entry added: Boot0001 for EFI/DEBIAN/GRUBX64.EFI" in outcome.result.message
        assert order == [0, 1]  # the network stays first
        raw = (efi / "efivars" / f"Boot0001-{GLOBAL_VARIABLE}").read_bytes()[4:]
        assert decode_load_option(raw).description == "debian:12 (sledge)"
