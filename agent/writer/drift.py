"""Telling real drift from the partition-table edits sledge itself makes.

A deploy may change an image's table after writing it: the backup GPT moves to
the end of a larger disk and a cloud-init seed adds an entry. A drift check that
flagged those chunks would cry wolf after every such deploy; one that accepted any
bytes in "table sectors" would let anyone rewrite the table unseen. So the edits
sledge may have made are replayed on the image's own bytes (agent.disk.expect), and
a chunk that differs from the image is "table updated" only when it equals the image
with one of those edits applied, byte for byte; the edit's writes past the image's
end (the moved backup) are checked on the disk too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.disk.expect import Edit, apply, beyond_image, same_outside
from agent.disk.tables import Read
from agent.image.manifest import Chunk


@dataclass(frozen=True)
class Drift:
    drifted: list[Chunk]
    table_only: list[Chunk]
    tables: list[str] = field(default_factory=list)  # table sectors past the image that differ
    edit: str = "as written"  # which of sledge's edits the disk was compared with

    @property
    def clean(self) -> bool:
        return not self.drifted and not self.tables


def classify(
    bad: Sequence[Chunk],
    edits: Sequence[Edit],
    image_size: int,
    sector: int,
    read_disk: Callable[[Chunk], bytes],
    fetch: Callable[[Chunk], bytes],
    disk: Read,
) -> Drift:
    """Split the differing chunks under the edit that explains the most; `fetch`: a chunk's verified
    image bytes; `read_disk`: what the disk holds there; `disk`: the disk by offset."""
    cache: dict[int, tuple[bytes, bytes]] = {}

    def pair(chunk: Chunk) -> tuple[bytes, bytes]:
        if chunk.index not in cache:
            cache[chunk.index] = (read_disk(chunk), fetch(chunk))
        return cache[chunk.index]

    best: Drift | None = None
    for edit in edits:
        spans = [(at, at + len(data)) for at, data in edit.writes] + list(edit.free)
        drifted, table_only = [], []
        for chunk in bad:
            end = chunk.offset + chunk.length
            if not any(a < end and b > chunk.offset for a, b in spans):
                drifted.append(chunk)
                continue
            on_disk, image = pair(chunk)
            expected = apply(image, chunk.offset, edit.writes)
            if same_outside(on_disk, expected, chunk.offset, edit.free):
                table_only.append(chunk)
            else:
                drifted.append(chunk)
        result = Drift(drifted, table_only, beyond_image(edit, image_size, disk, sector), edit.name)
        if result.clean:
            return result
        if best is None or len(result.drifted) + len(result.tables) < len(best.drifted) + len(best.tables):
            best = result
    assert best is not None, "edits always holds 'as written'"
    return best
