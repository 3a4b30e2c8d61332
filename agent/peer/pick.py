"""Which chunk a fetching thread takes next: a pure decision on bitmaps (no I/O, no clock).

A thread that commits to a chunk nobody can give it yet waits on that one chunk while others sit
at free peers (head-of-line blocking): with 6 threads and a young swarm, most of an agent's
threads waited on chunks that did not exist anywhere, and the agent idled while its link was free.
So a thread takes a chunk only once it is *ready*: this agent's own origin share, lowest first
(the origin's one copy should enter the swarm as early as it can), else the rarest of the chunks
that a peer not busy right now holds (random among equals, as BitTorrent's rarest first: the
copies spread evenly and no chunk is left to the last). Nothing ready: the caller waits for the
swarm to change. (Right after a peer served this agent a chunk, the swarm calls this with that
peer's bitmap alone as `free`: its slot has just freed, Swarm.served_by.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

SAMPLE = 64  # ready chunks weighed per pick: a pick costs the same for any image size


def set_bits(mask: int, start: int, limit: int) -> list[int]:
    """Up to `limit` indices of set bits in `mask`, from bit `start` upwards, then wrapping round."""
    out: list[int] = []
    for part in (mask >> start << start, mask & ((1 << start) - 1)):
        while part and len(out) < limit:
            low = part & -part
            out.append(low.bit_length() - 1)
            part ^= low
    return out


def choose(
    pending: int,
    share: int | None,
    free: Sequence[int],
    known: Sequence[int],
    rng: random.Random,
    chunks: int,
) -> int | None:
    """The next chunk to fetch, or None when none is ready.

    pending: bitmap of the chunks still to fetch; share: this agent's origin-share chunk that the
    origin may be asked for now (or None); free: the bitmaps of peers that may be asked now (not
    dropped, not answering 503); known: the bitmaps of all the peers it knows (for rarity).
    """
    if share is not None and pending >> share & 1:
        return share
    held = 0
    for have in free:
        held |= have
    ready = pending & held
    if not ready:
        return None
    candidates = set_bits(ready, rng.randrange(max(chunks, 1)), SAMPLE)
    best, best_key = candidates[0], (len(known) + 1, 2.0)
    for index in candidates:
        key = (sum(1 for have in known if have >> index & 1), rng.random())
        if key < best_key:
            best, best_key = index, key
    return best


def fallback(pending: int, rng: random.Random, chunks: int) -> int:
    """Any pending chunk (when waiting on peers no longer pays: it goes to the origin)."""
    return set_bits(pending, rng.randrange(max(chunks, 1)), 1)[0]
