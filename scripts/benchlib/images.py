"""Test images: fully random, half-sparse (64 MiB stripes of data and holes), and a v2 of one."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

from benchlib.proc import start, stop
from benchlib.system import MiB

STRIPE = 64 * MiB


class Keystream:
    """Pseudo-random bytes, unique per seed: AES-128-CTR over zeros (openssl, ~2 GB/s).

    Falls back to os.urandom (~0.3 GB/s) where openssl is not installed."""

    def __init__(self, seed: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("openssl"):
            key = hashlib.sha256(seed.encode()).hexdigest()[:32]
            argv = [
                "openssl",
                "enc",
                "-aes-128-ctr",
                "-nosalt",
                "-K",
                key,
                "-iv",
                "0" * 32,
                "-in",
                "/dev/zero",
            ]
            self.proc = start(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def read(self, n: int) -> bytes:
        if self.proc is None or self.proc.stdout is None:
            return os.urandom(n)
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise RuntimeError("openssl keystream ended early")
        return data

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def make_image(path: Path, size: int, seed: str, *, sparse: bool) -> None:
    """A `size`-byte image: every 64 MiB stripe random, or (sparse) every other stripe a hole."""
    stream = Keystream(seed)
    try:
        with open(path, "wb") as f:
            f.truncate(size)
            for index, offset in enumerate(range(0, size, STRIPE)):
                if sparse and index % 2 == 1:
                    continue
                os.pwrite(f.fileno(), stream.read(min(STRIPE, size - offset)), offset)
            os.fsync(f.fileno())
    finally:
        stream.close()


def make_v2(v1: Path, v2: Path, chunk_size: int, fraction: float, seed: str) -> list[int]:
    """Copy v1 (keeping holes) and put new random bytes in `fraction` of its chunks; return them."""
    subprocess.run(["cp", "--sparse=always", str(v1), str(v2)], check=True)
    size = v2.stat().st_size
    chunks = -(-size // chunk_size)
    changed = sorted(random.Random(seed).sample(range(chunks), max(1, round(fraction * chunks))))
    stream = Keystream(seed + "-v2")
    try:
        with open(v2, "r+b") as f:
            for index in changed:
                offset = index * chunk_size
                os.pwrite(f.fileno(), stream.read(min(chunk_size, size - offset)), offset)
            os.fsync(f.fileno())
    finally:
        stream.close()
    return changed
