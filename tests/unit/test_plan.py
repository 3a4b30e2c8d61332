"""The writer's pure plan: per-chunk actions by target state and options, and zero runs."""

from __future__ import annotations

import pytest

from agent.image.manifest import ChunkEntry, ChunkKind, Encoding, Manifest, Metadata, zero_digest
from agent.writer.plan import (
    MAX_RUN,
    Action,
    PlanOptions,
    Target,
    ZeroMode,
    after_check,
    iter_plan,
    plan,
    plan_chunk,
)

MiB = 1 << 20


def manifest(kinds: str, chunk: int = 4 * MiB, tail: int = 0) -> Manifest:
    """'dzzd' -> data, zero, zero, data chunks; `tail` shortens the last chunk."""
    size = len(kinds) * chunk - tail
    entries = []
    for i, k in enumerate(kinds):
        length = min(chunk, size - i * chunk)
        if k == "z":
            entries.append(ChunkEntry(zero_digest(length), ChunkKind.ZERO, Encoding.RAW, 0))
        else:
            entries.append(ChunkEntry(bytes([i + 1]) * 32, ChunkKind.DATA, Encoding.RAW, length))
    return Manifest.build(size, chunk, Metadata("t", "1"), entries)


FRESH = Target(fresh=True, zeroout_cheap=False)
DISK = Target(fresh=False, zeroout_cheap=True)
SLOW_ZERO_DISK = Target(fresh=False, zeroout_cheap=False)


@pytest.mark.parametrize(
    ("kind", "target", "options", "expected"),
    [
        ("d", FRESH, PlanOptions(), Action.FETCH),
        ("z", FRESH, PlanOptions(), Action.SKIP),
        ("d", DISK, PlanOptions(), Action.CHECK),
        ("d", DISK, PlanOptions(inplace=False), Action.FETCH),
        ("z", DISK, PlanOptions(), Action.ZERO),
        ("z", SLOW_ZERO_DISK, PlanOptions(), Action.CHECK),  # reading beats writing zeros
        ("z", SLOW_ZERO_DISK, PlanOptions(inplace=False), Action.ZERO),
        ("z", DISK, PlanOptions(zero_mode=ZeroMode.DONT_CARE), Action.SKIP),
        ("d", DISK, PlanOptions(zero_mode=ZeroMode.DONT_CARE), Action.CHECK),
    ],
)
def test_plan_chunk(kind: str, target: Target, options: PlanOptions, expected: Action) -> None:
    assert plan_chunk(manifest(kind).chunk(0), target, options) is expected


def test_after_check() -> None:
    m = manifest("dz")
    assert after_check(m.chunk(0), True) is Action.SKIP
    assert after_check(m.chunk(0), False) is Action.FETCH
    assert after_check(m.chunk(1), False) is Action.ZERO


def test_zero_runs_become_one_step_and_cover_every_chunk_once() -> None:
    m = manifest("dzzzdzz", tail=512)
    steps = plan(m, DISK, PlanOptions())
    assert [(s.chunk.index, s.action, s.count) for s in steps] == [
        (0, Action.CHECK, 1),
        (1, Action.ZERO, 3),
        (4, Action.CHECK, 1),
        (5, Action.ZERO, 2),
    ]
    assert steps[1].size == 12 * MiB and steps[3].size == 8 * MiB - 512
    assert sum(s.size for s in steps) == m.image_size
    assert sum(s.count for s in steps) == len(m)


def test_runs_are_capped() -> None:
    n = MAX_RUN // (4 * MiB) + 3
    steps = plan(manifest("z" * n), FRESH, PlanOptions())
    assert [s.count for s in steps] == [MAX_RUN // (4 * MiB), 3]
    assert all(s.action is Action.SKIP for s in steps)


def test_the_plan_is_lazy() -> None:
    """Steps come as the chunks are read: a huge manifest costs no memory per chunk up front."""

    class Counting:
        def __init__(self, m: Manifest) -> None:
            self.m, self.read = m, 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            for chunk in self.m:
                self.read += 1
                yield chunk

    m = Counting(manifest("d" * 200))
    steps = iter_plan(m, DISK, PlanOptions())  # type: ignore[arg-type]
    assert next(steps).action is Action.CHECK
    assert m.read <= 2
    assert len(list(steps)) == 199


def test_thread_counts_follow_the_cores_unless_given() -> None:
    from agent.writer.pipeline import WriteOptions, thread_counts

    assert thread_counts(WriteOptions(), 1) == (4, 3)
    assert thread_counts(WriteOptions(), 2) == (4, 3)
    assert thread_counts(WriteOptions(), 16) == (18, 8)  # every core decompresses and hashes
    assert thread_counts(WriteOptions(), 64) == (66, 8)
    assert thread_counts(WriteOptions(workers=2, write_threads=1), 64) == (2, 1)
