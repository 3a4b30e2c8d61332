"""Which chunks of an image an agent holds: one bit per chunk index, sent as base64."""

from __future__ import annotations

import base64
import binascii

from agent.peer.errors import PeerError

MAX_CHUNKS = 1 << 16  # 8 KiB of bitmap: 64 GiB images at 1 MiB chunks, 4 TiB at 64 MiB
MAX_TEXT = 4 * (MAX_CHUNKS // 8 + 2) // 3 + 4


class Have:
    """A mutable set of chunk indices in [0, count); thread safety is the caller's."""

    def __init__(self, count: int, bits: int = 0) -> None:
        if not 0 <= count <= MAX_CHUNKS:
            raise PeerError(f"have-bitmap: expected 0..{MAX_CHUNKS} chunks, got {count}")
        self.count = count
        self.bits = bits & ((1 << count) - 1)

    def add(self, index: int) -> None:
        self.bits |= 1 << index

    def __contains__(self, index: int) -> bool:
        return bool(self.bits >> index & 1)

    def __len__(self) -> int:
        return self.bits.bit_count()

    def complete(self, wanted: int) -> bool:
        """Holds every chunk of `wanted` (a mask of the chunks worth fetching)."""
        return self.bits & wanted == wanted

    def encode(self) -> str:
        raw = self.bits.to_bytes((self.count + 7) // 8, "little")
        return base64.b64encode(raw).decode()

    @classmethod
    def decode(cls, text: str, count: int) -> Have:
        if len(text) > MAX_TEXT:
            raise PeerError(f"have-bitmap: expected at most {MAX_TEXT} characters, got {len(text)}")
        if not text:
            return cls(count)  # holds nothing yet
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise PeerError("have-bitmap: expected base64") from None
        if len(raw) != (count + 7) // 8:
            raise PeerError(
                f"have-bitmap: expected {(count + 7) // 8} bytes for {count} chunks, got {len(raw)}"
            )
        return cls(count, int.from_bytes(raw, "little"))
