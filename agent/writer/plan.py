"""Pure decisions: what to do with each chunk, given the manifest and the target.

CHECK  read the target's range and hash it; equal -> done, else FETCH
FETCH  get the stored bytes, decode, verify, write
ZERO   make the range read as zeros (BLKZEROOUT, or plain zero writes)
SKIP   nothing to do (a zero chunk on a fresh sparse file, or zeros as don't-care)
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from agent.image.manifest import Chunk, ChunkKind, Manifest


class Action(enum.Enum):
    CHECK = "check"
    FETCH = "fetch"
    ZERO = "zero"
    SKIP = "skip"


class ZeroMode(enum.Enum):
    ZERO = "zero"  # make zero chunks read as zeros
    DONT_CARE = "dont-care"  # leave whatever is there


@dataclass(frozen=True)
class Target:
    """What the writer knows about the target before touching it."""

    fresh: bool  # a sparse file created (or emptied) for this write: reads as zeros
    zeroout_cheap: bool  # the device zeroes without writing (WRITE ZEROES / fallocate)


@dataclass(frozen=True)
class PlanOptions:
    inplace: bool = True
    zero_mode: ZeroMode = ZeroMode.ZERO


MAX_RUN = 256 << 20  # bytes of consecutive zero (or skipped) chunks handled as one step


@dataclass(frozen=True)
class Step:
    chunk: Chunk  # the first chunk of the step
    action: Action
    count: int = 1  # consecutive chunks (ZERO and SKIP runs): one BLKZEROOUT for all of them
    length: int = 0  # bytes the step covers (0: the chunk's own length)

    @property
    def size(self) -> int:
        return self.length or self.chunk.length


def plan_chunk(chunk: Chunk, target: Target, options: PlanOptions) -> Action:
    if chunk.kind is ChunkKind.ZERO:
        if target.fresh or options.zero_mode is ZeroMode.DONT_CARE:
            return Action.SKIP
        # Where zeroing costs a write of every byte, reading first is cheaper
        # when the range already holds zeros (a re-deploy, a resume).
        if options.inplace and not target.zeroout_cheap:
            return Action.CHECK
        return Action.ZERO
    if target.fresh or not options.inplace:
        return Action.FETCH
    return Action.CHECK


def iter_plan(manifest: Manifest, target: Target, options: PlanOptions) -> Iterator[Step]:
    """One step per chunk, except that runs of ZERO or SKIP chunks (up to MAX_RUN bytes) are one
    step. Lazy: a manifest at the decoder's limit (2^21 chunks) costs no memory per chunk here."""
    last: Step | None = None
    for chunk in manifest:
        action = plan_chunk(chunk, target, options)
        if (
            last is not None
            and action is last.action
            and action in (Action.ZERO, Action.SKIP)
            and last.size + chunk.length <= MAX_RUN
        ):
            last = Step(last.chunk, action, last.count + 1, last.size + chunk.length)
            continue
        if last is not None:
            yield last
        last = Step(chunk, action)
    if last is not None:
        yield last


def plan(manifest: Manifest, target: Target, options: PlanOptions) -> list[Step]:
    """iter_plan as a list (tests, and callers that want the whole plan)."""
    return list(iter_plan(manifest, target, options))


def after_check(chunk: Chunk, matches: bool) -> Action:
    """The action once a CHECK has hashed what the target holds."""
    if matches:
        return Action.SKIP
    return Action.ZERO if chunk.kind is ChunkKind.ZERO else Action.FETCH
