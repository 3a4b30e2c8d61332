"""Guessing the image's table sectors back from a disk sledge deployed it to (rebuild, rollback)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.disk import undo
from agent.disk.gpt import fix_backup_gpt
from agent.disk.seedplan import plan_seed
from agent.disk.tables import read_tables
from tests.tools import need

MiB = 1 << 20
IMAGE, DISK = 16 * MiB, 40 * MiB


def gpt_image(path: Path) -> bytes:
    need("sgdisk")
    with open(path, "wb") as f:
        f.truncate(IMAGE)
    subprocess.run(["sgdisk", "-n", "1:2048:+4M", "-n", "2:0:0", str(path)], check=True, capture_output=True)
    return path.read_bytes()


def deployed(tmp_path: Path, image: Path, seed: bool = True) -> Path:
    """The image on a larger disk with sledge's edits: backup moved, (a seed entry added)."""
    disk = tmp_path / "disk.img"
    shutil.copyfile(image, disk)
    with open(disk, "r+b") as f:
        f.truncate(DISK)
        assert fix_backup_gpt(f.fileno(), 512, DISK)
        if seed:
            tables = read_tables(lambda o, n: os.pread(f.fileno(), n, o), DISK, 512)
            for offset, data in plan_seed(tables, 2 * MiB, guid_seed=b"t").writes:
                os.pwrite(f.fileno(), data, offset)
    return disk


def undone(disk: Path) -> bytes:
    held = disk.read_bytes()
    data = bytearray(held[:IMAGE])
    writes = undo.image_tables(lambda o, n: held[o : o + n], IMAGE, DISK, 512)
    assert writes
    undo.lay_over(memoryview(data), 0, writes)
    return bytes(data)


@pytest.mark.parametrize("seed", [True, False])
def test_undoing_sledges_edits_gives_the_image_back(tmp_path: Path, seed: bool) -> None:
    image = gpt_image(tmp_path / "image.img")
    disk = deployed(tmp_path, tmp_path / "image.img", seed)
    assert disk.read_bytes()[:IMAGE] != image  # the edits did change the image's sectors
    assert undone(disk) == image


def test_a_disk_nobody_moved_or_with_no_gpt_gives_no_guess(tmp_path: Path) -> None:
    gpt_image(tmp_path / "image.img")
    same = (tmp_path / "image.img").read_bytes()
    assert undo.image_tables(lambda o, n: same[o : o + n], IMAGE, IMAGE, 512) == []
    bigger = same + bytes(DISK - IMAGE)  # on a larger disk, but its backup was never moved
    assert undo.image_tables(lambda o, n: bigger[o : o + n], IMAGE, DISK, 512) == []
    noise = os.urandom(64 * 1024) + bytes(DISK - 64 * 1024)
    assert undo.image_tables(lambda o, n: noise[o : o + n], IMAGE, DISK, 512) == []


def test_a_guess_only_touches_table_sectors(tmp_path: Path) -> None:
    gpt_image(tmp_path / "image.img")
    held = deployed(tmp_path, tmp_path / "image.img").read_bytes()
    writes = undo.image_tables(lambda o, n: held[o : o + n], IMAGE, DISK, 512)
    for offset, data in writes:
        assert offset + len(data) <= 34 * 512 or offset >= IMAGE - 33 * 512, offset
    assert undo.overlaps(writes, 0, MiB) and undo.overlaps(writes, IMAGE - MiB, MiB)
    assert not undo.overlaps(writes, MiB, IMAGE - 2 * MiB)


def test_hostile_tables_give_a_guess_or_none_never_an_error(tmp_path: Path) -> None:
    """A previous tenant's tables, CRCs sealed so the careful reader gets past them: any header
    field or entry byte changed yields writes inside the image, or none, and never raises."""
    import random
    import struct
    import zlib

    from agent.disk.gpt import seal_header

    gpt_image(tmp_path / "image.img")
    base = deployed(tmp_path, tmp_path / "image.img").read_bytes()
    head = 64 * 1024  # the mutations stay in here; the rest is read from the deployed disk
    rng = random.Random(13)
    guessed = 0
    for _ in range(200):
        disk = bytearray(base[:head])
        header = bytearray(disk[512:1024])
        field = rng.choice([24, 32, 40, 48, 72, 80, 84])  # my, alt, first/last usable, entries lba/count/size
        width = 4 if field >= 80 else 8
        value = rng.choice(
            [0, 1, 2, 33, 34, 2047, IMAGE // 512, DISK // 512 - 1, 2**32 - 1, rng.getrandbits(width * 8)]
        )
        struct.pack_into("<I" if width == 4 else "<Q", header, field, value % (1 << (width * 8)))
        entry = 1024 + 128 * rng.randrange(4)
        disk[entry + rng.randrange(128)] = rng.getrandbits(8)
        struct.pack_into("<I", header, 88, zlib.crc32(bytes(disk[1024 : 1024 + 128 * 128])))
        seal_header(header, 92)
        disk[512:1024] = header
        held = bytes(disk)

        def read(offset: int, length: int, held: bytes = held) -> bytes:
            if offset + length <= head:
                return held[offset : offset + length]
            return (
                (held + base[head : offset + length])[offset:]
                if offset < head
                else base[offset : offset + length]
            )

        writes = undo.image_tables(read, IMAGE, DISK, 512)
        for offset, data in writes:
            assert offset >= 0 and offset + len(data) <= IMAGE
        guessed += bool(writes)
    assert 0 < guessed < 200  # both paths were taken: a guess, and none
