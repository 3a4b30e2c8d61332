"""Turning stored chunk bytes into trusted raw bytes: decompress within bounds, then verify."""

from __future__ import annotations

import threading
from typing import Any

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


class Decoder:
    """Stored chunk bytes -> verified raw bytes in the caller's buffer, for many threads at once.

    A zstd chunk is decompressed straight into `out` (an aligned write buffer): no temporary
    of the chunk's size is allocated, faulted in, copied and freed per chunk, which cost as
    much CPU as a third of the decompression itself. Each thread keeps its own zstd context
    (one may not be shared, and making one per chunk costs its allocation every time).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _context(self) -> Any:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            import zstandard  # here: a write of raw chunks never needs it (start-up time)

            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def decode_into(self, chunk: Chunk, stored: memoryview, out: memoryview) -> memoryview:
        """Return a view of the chunk's raw bytes, verified: `stored` itself for a raw chunk,
        else `out` filled by decompressing `stored`. Raises ChunkInvalid."""
        if len(stored) != chunk.stored_len:
            raise ChunkInvalid(chunk, f"expected {chunk.stored_len} stored bytes, got {len(stored)}")
        if chunk.encoding is Encoding.ZSTD:
            view = out[: chunk.length]
            self._decompress_into(chunk, stored, view)
        else:
            view = stored
        verify_raw(chunk, view)
        return view

    def _decompress_into(self, chunk: Chunk, stored: memoryview, out: memoryview) -> None:
        """Decompress one zstd frame that declares exactly len(out) bytes and fills it exactly.

        The output can never pass `out`'s end (the reader writes into it and nothing else), and
        the declared size bounds zstd's own window buffer. Reading across frames after the end
        makes a second frame or trailing garbage an error instead of silently ignored bytes.
        """
        import zstandard

        try:
            declared = zstandard.frame_content_size(stored)
        except zstandard.ZstdError as exc:
            raise ChunkInvalid(chunk, f"zstd frame header: {exc}") from None
        if declared != len(out):
            raise ChunkInvalid(chunk, f"zstd frame declares {declared} bytes, expected {len(out)}")
        got = 0
        try:
            reader = self._context().stream_reader(stored, read_across_frames=True)
            with reader:
                while got < len(out):
                    n = reader.readinto(out[got:])
                    if not n:
                        break
                    got += n
                extra = reader.read(1) if got == len(out) else b""
        except zstandard.ZstdError as exc:
            raise ChunkInvalid(chunk, f"zstd: {exc}") from None
        if got != len(out):
            raise ChunkInvalid(chunk, f"expected {len(out)} bytes after zstd, got {got}")
        if extra:
            raise ChunkInvalid(chunk, "zstd: data after the chunk's frame")
