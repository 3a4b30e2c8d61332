"""Turning stored chunk bytes into trusted raw bytes: decompress within bounds, then verify."""

from __future__ import annotations

import blake3

from agent.image.errors import ImageError
from agent.image.manifest import Chunk, ChunkKind, Encoding


class ChunkInvalid(ImageError, ValueError):
    """Stored bytes that do not decode to the chunk the manifest names."""

    def __init__(self, chunk: Chunk, reason: str) -> None:
        self.chunk = chunk
        self.reason = reason
        super().__init__(f"{chunk.describe()}: {reason}")


def decode_stored(chunk: Chunk, stored: bytes | bytearray | memoryview) -> bytes:
    """Return the raw chunk bytes; raise ChunkInvalid unless they hash to the chunk's digest."""
    if chunk.kind is ChunkKind.ZERO:
        raise ChunkInvalid(chunk, "zero chunks are not stored")
    if len(stored) != chunk.stored_len:
        raise ChunkInvalid(chunk, f"expected {chunk.stored_len} stored bytes, got {len(stored)}")
    zstd = chunk.encoding is Encoding.ZSTD
    raw = decompress_bounded(chunk, stored) if zstd else bytes(stored)
    verify_raw(chunk, raw)
    return raw


def decompress_bounded(chunk: Chunk, stored: bytes | bytearray | memoryview) -> bytes:
    """Decompress one zstd frame that must declare exactly the chunk's length.

    The declared size is checked before any memory is allocated for it, so a zstd
    bomb cannot grow past a chunk.
    """
    import zstandard  # here, not at the top: a write of raw chunks never needs it (start-up time)

    data = stored  # zstandard reads any buffer: no copy of the stored bytes
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ChunkInvalid(chunk, f"zstd frame header: {exc}") from None
    if declared != chunk.length:
        raise ChunkInvalid(chunk, f"zstd frame declares {declared} bytes, expected {chunk.length}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ChunkInvalid(chunk, f"zstd: {exc}") from None
    if len(raw) != chunk.length:
        raise ChunkInvalid(chunk, f"expected {chunk.length} bytes after zstd, got {len(raw)}")
    return raw


def verify_raw(chunk: Chunk, raw: bytes | bytearray | memoryview) -> None:
    if len(raw) != chunk.length:
        raise ChunkInvalid(chunk, f"expected {chunk.length} bytes, got {len(raw)}")
    actual = blake3.blake3(raw).digest()
    if actual != chunk.digest:
        raise ChunkInvalid(chunk, f"blake3 mismatch: calculated {actual.hex()}, should be {chunk.hex}")
