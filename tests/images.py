"""Test images made on the spot: random, half-sparse, all-zero, odd-sized."""

from __future__ import annotations

import os
import random
from pathlib import Path

MiB = 1 << 20


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_image(path: Path, size: int, stripes: list[tuple[int, bytes]]) -> Path:
    """A sparse file of `size` bytes holding each (offset, data); holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in stripes:
            os.pwrite(f.fileno(), data, offset)
    return path


def random_image(path: Path, size: int, seed: int = 1) -> Path:
    return write_image(path, size, [(0, random_bytes(size, seed))])


def half_sparse_image(path: Path, size: int, stripe: int = 2 * MiB, seed: int = 2) -> Path:
    """Stripes of random data and holes, alternating; plus some compressible text."""
    stripes = []
    for i, offset in enumerate(range(0, size, 2 * stripe)):
        n = min(stripe, size - offset)
        data = random_bytes(n, seed + i) if i % 2 == 0 else (b"sledge text %d\n" % i) * (n // 16)
        stripes.append((offset, data[:n]))
    return write_image(path, size, stripes)
