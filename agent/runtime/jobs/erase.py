"""erase: make disks forget what they held.

    metadata  zero where signatures live: both ends of the disk (MBR, both GPT
              copies, md 0.90/1.0 superblocks at the end, LVM, most filesystems),
              the same at each partition's start and end, and btrfs's superblock
              copies at 64 MiB and 256 GiB. Partitions are those the kernel, the
              MBR (with its EBR chain) or either GPT copy lists, trusted or not,
              read by agent.disk.tables; every GPT header and entry array found is
              zeroed where the headers put it. A new partition table cannot bring
              an old filesystem or RAID member back to life.
    full      every byte: BLKZEROOUT, which the kernel turns into WRITE ZEROES
              (unmapping where the device guarantees zeroes after it) or plain
              zero writes. Discard alone is never trusted to zero.

Without hints every eligible disk is erased, in parallel; read-only disks are
skipped with a note, disks holding the running system or mounted never touched.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from agent import blockdev
from agent import protocol as p
from agent.disk.tables import Tables, read_tables
from agent.hardware.errors import HardwareError
from agent.hardware.hints import refusal, select_disk
from agent.hardware.model import Disk
from agent.progress import human_bytes
from agent.runtime.jobs import JobContext, Outcome, failed
from agent.writer.errors import WriteError

MiB = 1 << 20
EDGE = 16 * MiB
BTRFS_COPIES = (64 * MiB, 256 << 30)
STEP = 256 * MiB
NEVER = ("loop", "ram", "zram", "rom")


def metadata_ranges(
    size: int, partitions: Sequence[tuple[int, int]], extra: Sequence[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """Pure: the (offset, length) ranges a metadata erase zeroes, merged and inside the disk;
    `extra` (GPT headers and arrays) are zeroed as they are."""
    spans: list[tuple[int, int]] = [
        (off, min(n, size - off)) for off, n in extra if 0 <= off < size and n > 0
    ]
    for start, length in [(0, size), *partitions]:
        end = min(start + length, size)
        if end <= start:
            continue
        spans.append((start, min(EDGE, end - start)))
        spans.append((max(start, end - EDGE), min(EDGE, end - start)))
        spans += [(start + c, min(MiB, end - start - c)) for c in BTRFS_COPIES if start + c < end]
    spans.sort()
    merged: list[tuple[int, int]] = []
    for off, length in spans:
        if merged and off <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            merged.append((off, length))
    return merged


def table_spans(tables: Tables) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Pure: (start, size) in bytes of every partition any table lists, trusted or not (a stranger's
    disk: a copy the firmware would reject may still be the one another tool reads), and of every
    GPT header and entry array seen, wherever the headers put them."""
    s = tables.sector
    parts = [(q.first * s, (q.last - q.first + 1) * s) for q in tables.partitions(trusted_only=False)]
    return parts, tables.structures()


def targets(ctx: JobContext) -> tuple[list[Disk], list[str]]:
    """The disks to erase and notes on those skipped."""
    disks = ctx.machine.inventory().disks
    hints = ctx.assignment.params.disk.as_dict()
    if hints:
        return [select_disk(disks, hints)], []
    chosen, notes = [], []
    for disk in disks:
        if disk.kind in NEVER:
            continue
        why = refusal(disk)
        if why:
            notes.append(f"{disk.path} skipped: {why.removeprefix('refused: ')}")
        else:
            chosen.append(disk)
    return chosen, notes


class _Progress:
    def __init__(self, ctx: JobContext, total: int) -> None:
        self.ctx, self.total, self.done = ctx, total, 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            # the total was estimated from the kernel's partitions; the tables may list more
            self.total = max(self.total, self.done)
            done, total = self.done, self.total
        self.ctx.progress(f"erased {human_bytes(done)} of {human_bytes(total)}", done, total)


def _erase_one(ctx: JobContext, disk: Disk, mode: p.EraseMode, progress: _Progress) -> str:
    target = ctx.disks.open_write(disk.path, 0)
    try:
        size = target.size
        if mode is p.EraseMode.METADATA:
            sector = blockdev.logical_sector_size(target.buffered_fd)
            # the erase reads the tables itself rather than trusting the kernel's view: a kernel
            # that did not parse them (or a stale view) must not hide a partition
            fd = target.buffered_fd
            tables = read_tables(lambda offset, length: os.pread(fd, length, offset), size, sector)
            listed, structures = table_spans(tables)
            parts = {(q.start, q.size) for q in disk.partitions} | set(listed)
            ranges = metadata_ranges(size, sorted(parts), structures)
        else:
            ranges = [(off, min(STEP, size - off)) for off in range(0, size, STEP)]
        for off, length in ranges:
            if ctx.cancel.is_set():
                raise WriteError(f"erase of {disk.path} cancelled at offset {off}")
            target.zero(off, length)
            progress.add(length)
        os.fsync(target.buffered_fd)
        os.fsync(target.fd)
        return f"{disk.path}: {mode.value} erase, {human_bytes(sum(n for _, n in ranges))} zeroed"
    finally:
        target.close()


def erase(ctx: JobContext) -> Outcome:
    mode = ctx.assignment.params.erase_mode
    try:
        disks, notes = targets(ctx)
    except HardwareError as exc:
        return failed(f"disk selection: {exc}")
    for note in notes:
        ctx.warn(note)
    if not disks:
        return failed("no disk to erase: " + ("; ".join(notes) or "none found"))
    ctx.stage(f"{mode.value} erase of {', '.join(d.path for d in disks)}")
    total = sum(
        sum(n for _, n in metadata_ranges(d.size, [(q.start, q.size) for q in d.partitions]))
        if mode is p.EraseMode.METADATA
        else d.size
        for d in disks
    )
    progress = _Progress(ctx, total)
    with ThreadPoolExecutor(max_workers=len(disks), thread_name_prefix="erase") as pool:
        futures = [pool.submit(_erase_one, ctx, d, mode, progress) for d in disks]
        results, errors = [], []
        for disk, fut in zip(disks, futures, strict=True):
            try:
                results.append(fut.result())
            except (WriteError, OSError) as exc:
                errors.append(f"{disk.path}: {exc}")
    for line in results:
        ctx.log(line)
    message = "; ".join(results + errors + notes)
    names = ",".join(d.path for d in disks)
    if errors:
        return failed(message, names)
    return Outcome(p.JobResult(p.Outcome.SUCCEEDED, message, names))
