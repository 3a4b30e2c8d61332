from __future__ import annotations

import pytest

from agent.runtime.jobs.erase import EDGE, metadata_ranges

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(
    ("size", "parts", "expected"),
    [
        # a small disk: both ends overlap into one range
        (20 * MiB, [], [(0, 20 * MiB)]),
        # a 1 GiB disk: both ends and the btrfs copy at 64 MiB
        (GiB, [], [(0, EDGE), (64 * MiB, MiB), (GiB - EDGE, EDGE)]),
        # a partition from 1 MiB to 513 MiB: its ends and btrfs copy, merged with the disk's where they touch
        (
            GiB,
            [(MiB, 512 * MiB)],
            [(0, MiB + EDGE), (64 * MiB, 2 * MiB), (513 * MiB - EDGE, EDGE), (GiB - EDGE, EDGE)],
        ),
        # a partition past the disk's end is clipped
        (64 * MiB, [(60 * MiB, 100 * MiB)], [(0, EDGE), (48 * MiB, EDGE)]),
    ],
)
def test_metadata_ranges(size: int, parts: list[tuple[int, int]], expected: list[tuple[int, int]]) -> None:
    assert metadata_ranges(size, parts) == expected


def test_ranges_cover_both_gpt_copies_and_stay_inside_the_disk() -> None:
    size = 500 * GiB + 12345 * 512
    ranges = metadata_ranges(size, [(MiB, 300 * GiB)])
    assert ranges[0][0] == 0 and ranges[0][1] >= 34 * 512
    assert ranges[-1][0] + ranges[-1][1] == size
    assert all(off >= 0 and off + n <= size for off, n in ranges)
    assert any(off <= MiB + 256 * GiB < off + n for off, n in ranges)  # btrfs copy inside the partition
