"""The writer's decode path: zstd straight into the write buffer, bounded, verified, per-thread contexts."""

from __future__ import annotations

import mmap
import os
import random
import threading

import blake3
import pytest
import zstandard

from agent.image.chunk import ChunkInvalid, Decoder
from agent.image.manifest import Chunk, ChunkKind, Encoding

LENGTH = 256 << 10
SENTINEL = 0xA5


def raw_bytes(seed: int, length: int = LENGTH) -> bytes:
    """Compressible bytes: random words with runs of zeros, like a filesystem's data."""
    rng = random.Random(seed)
    words = [bytes(rng.getrandbits(8) for _ in range(rng.randint(2, 9))) for _ in range(64)]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) if rng.random() < 0.9 else bytes(rng.randint(1, 300))
    return bytes(out[:length])


def chunk_for(raw: bytes, stored: bytes, encoding: Encoding = Encoding.ZSTD, length: int = LENGTH) -> Chunk:
    return Chunk(0, 0, length, blake3.blake3(raw).digest(), ChunkKind.DATA, encoding, len(stored))


def out_buffer() -> tuple[mmap.mmap, memoryview]:
    """A page-aligned buffer larger than the chunk, filled with a sentinel to see what was touched."""
    buf = mmap.mmap(-1, 2 * LENGTH)
    buf.write(bytes([SENTINEL]) * len(buf))
    return buf, memoryview(buf)


def decode(chunk: Chunk, stored: bytes) -> tuple[memoryview, memoryview]:
    _, out = out_buffer()
    return Decoder().decode_into(chunk, memoryview(stored), out), out


def test_zstd_is_decompressed_into_the_callers_buffer_and_nothing_past_it() -> None:
    raw = raw_bytes(1)
    stored = zstandard.ZstdCompressor(level=3).compress(raw)
    assert len(stored) < LENGTH // 2
    view, out = decode(chunk_for(raw, stored), stored)
    assert view.obj is out.obj and bytes(view) == raw
    assert set(bytes(out[LENGTH:])) == {SENTINEL}


def test_a_raw_chunk_is_verified_where_it_was_received() -> None:
    raw = raw_bytes(2)
    stored = memoryview(bytearray(raw))
    _, out = out_buffer()
    view = Decoder().decode_into(chunk_for(raw, raw, Encoding.RAW), stored, out)
    assert view.obj is stored.obj
    assert set(bytes(out)) == {SENTINEL}


def fcs_patched(frame: bytes, declared: int) -> bytes:
    """The frame with its 4-byte Frame_Content_Size field rewritten (a liar's header)."""
    fhd = frame[4]
    assert fhd >> 6 == 2, "expected a 4-byte content size field"
    start = 5 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 3]
    return frame[:start] + declared.to_bytes(4, "little") + frame[start + 4 :]


def frame_with_4_byte_size(raw: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    assert frame[4] >> 6 == 2
    return frame


HOSTILE = {
    # name: (stored bytes from a good frame `f` of `raw`, expected message)
    "declares more": (lambda f, raw: fcs_patched(f, LENGTH + 1), "declares 262145 bytes, expected 262144"),
    "declares less": (lambda f, raw: fcs_patched(f, LENGTH - 1), "declares 262143 bytes"),
    "no declared size": (
        lambda f, raw: zstandard.ZstdCompressor(write_content_size=False).compress(raw),
        "declares -1 bytes",
    ),
    "not zstd": (lambda f, raw: os.urandom(len(f)), "zstd frame header"),
    "truncated": (lambda f, raw: f[: len(f) - 40], "after zstd, got"),
    "trailing garbage": (lambda f, raw: f + b"garbage", "zstd"),
    "a second frame": (lambda f, raw: f + zstandard.ZstdCompressor().compress(b"more"), "data after"),
    "a bit flipped": (lambda f, raw: f[:200] + bytes([f[200] ^ 1]) + f[201:], "zstd|blake3"),
    "another chunk's bytes": (
        lambda f, raw: frame_with_4_byte_size(raw_bytes(9)),
        "blake3 mismatch: calculated",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_stored_bytes_are_refused_and_never_pass_the_buffer(name: str) -> None:
    raw = raw_bytes(3)
    good = frame_with_4_byte_size(raw)
    make, message = HOSTILE[name]
    stored = make(good, raw)
    chunk = chunk_for(raw, stored)
    _, out = out_buffer()
    with pytest.raises(ChunkInvalid, match=message) as caught:
        Decoder().decode_into(chunk, memoryview(stored), out)
    assert caught.value.chunk == chunk
    assert set(bytes(out[LENGTH:])) == {SENTINEL}


def test_a_frame_that_holds_more_than_it_declares_cannot_write_past_the_chunk() -> None:
    """A frame of twice the chunk, its header rewritten to declare the chunk's length: zstd stops
    at the buffer's end and the chunk is refused (too much data), nothing past the buffer moves."""
    raw = raw_bytes(4, 2 * LENGTH)
    stored = fcs_patched(frame_with_4_byte_size(raw), LENGTH)
    chunk = chunk_for(raw[:LENGTH], stored)
    _, out = out_buffer()
    with pytest.raises(ChunkInvalid):
        Decoder().decode_into(chunk, memoryview(stored), out)
    assert set(bytes(out[LENGTH:])) == {SENTINEL}


def test_stored_length_must_match_the_manifest() -> None:
    raw = raw_bytes(5)
    stored = frame_with_4_byte_size(raw)
    chunk = chunk_for(raw, stored + b"x")
    with pytest.raises(ChunkInvalid, match=f"expected {len(stored) + 1} stored bytes, got {len(stored)}"):
        decode(chunk, stored)


def test_one_decoder_serves_many_threads_at_once() -> None:
    """Each thread gets its own zstd context: decoding in parallel gives every chunk right."""
    chunks = []
    for seed in range(16):
        raw = raw_bytes(100 + seed)
        stored = zstandard.ZstdCompressor(level=1 + seed % 5).compress(raw)
        chunks.append((chunk_for(raw, stored), stored, raw))
    decoder = Decoder()
    errors: list[BaseException] = []
    contexts: set[int] = set()
    together = threading.Barrier(4)  # no thread ends (freeing its context) before all are counted

    def work(offset: int) -> None:
        buf = mmap.mmap(-1, LENGTH)
        try:
            for i in range(40):
                chunk, stored, raw = chunks[(offset + i) % len(chunks)]
                view = decoder.decode_into(chunk, memoryview(stored), memoryview(buf))
                assert bytes(view) == raw
                view.release()
            contexts.add(id(decoder._context()))
        except BaseException as exc:
            errors.append(exc)
        finally:
            together.wait(10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(contexts) == 4
