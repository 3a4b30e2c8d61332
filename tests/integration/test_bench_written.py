"""The bench's write check (scripts/benchlib/written.py): a GPT image that sledge's own table fix
moved to a larger device passes; any other difference, in the data or in the table sectors, fails.

The "device" is a file larger than the image; the agent's fix_backup_gpt makes the edits a deploy
makes, so the check is tested against the real writer's behaviour, not against itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.disk.gpt import fix_backup_gpt
from tests.tools import need

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib.written import check_written

MiB = 1 << 20
IMAGE = 8 * MiB


def gpt_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE)
    subprocess.run(["sgdisk", "-n", "1:2048:+4M", "-n", "2:0:0", str(path)], check=True, capture_output=True)
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), os.urandom(5 * MiB), MiB)
    return path


def deployed(image: Path, device: Path, size: int) -> Path:
    """The image on a `size`-byte device, tables fixed as the writer fixes them."""
    shutil.copyfile(image, device)
    with open(device, "r+b") as f:
        f.truncate(size)
        assert fix_backup_gpt(f.fileno(), 512, size)
    return device


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0x01]), offset)


@pytest.mark.root  # the check drops the page cache, as the bench does before comparing
def test_the_check_allows_sledges_gpt_relocation_and_nothing_else(tmp_path: Path) -> None:
    need("sgdisk", "cmp")
    image = gpt_image(tmp_path / "image.img")
    device = deployed(image, tmp_path / "device.img", 3 * IMAGE)
    with open(image, "rb") as a, open(device, "rb") as b:
        assert a.read(1024) != b.read(1024)  # the writer did change the table sectors
    assert check_written(image, str(device), IMAGE, gpt_fixed=True) == (True, "")
    # byte for byte (a peer's copy) it differs, in the protective MBR's size (cmp counts from 1)
    ok, why = check_written(image, str(device), IMAGE, gpt_fixed=False)
    assert not ok and "byte 460" in why, why

    # the same size as the image's disk: the writer changes nothing, the check expects nothing
    same = tmp_path / "same.img"
    shutil.copyfile(image, same)
    assert check_written(image, str(same), IMAGE, gpt_fixed=True) == (True, "")

    for offset in (3 * MiB + 17, 100, 512 + 40, IMAGE - 512 + 3):  # data, MBR code, header, old backup
        bad = tmp_path / f"bad-{offset}.img"
        shutil.copyfile(device, bad)
        flip(bad, offset)
        ok, why = check_written(image, str(bad), IMAGE, gpt_fixed=True)
        assert not ok and f"offset {offset}" in why, (offset, why)
    # the relocated backup at the device's end must mirror the primary
    bad = tmp_path / "bad-backup.img"
    shutil.copyfile(device, bad)
    flip(bad, 3 * IMAGE - 512 + 60)
    ok, why = check_written(image, str(bad), IMAGE, gpt_fixed=True)
    assert not ok and "no backup GPT" in why, why
    # a plain copy onto the larger device (no relocation) is not what sledge must leave
    plain = tmp_path / "plain.img"
    shutil.copyfile(image, plain)
    with open(plain, "r+b") as f:
        f.truncate(3 * IMAGE)
    assert not check_written(image, str(plain), IMAGE, gpt_fixed=True)[0]
