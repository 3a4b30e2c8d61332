"""erase, inventory and reboot."""

from __future__ import annotations

import fcntl
import os
import struct

from agent import blockdev
from agent import protocol as p
from agent.hardware.hints import HintError, SelectionError
from agent.progress import human_bytes
from agent.runtime.jobs import JobContext, Outcome, choose_disk, failed
from agent.writer.device import OpenTarget, open_target
from agent.writer.errors import WriteError

BLKDISCARD = 0x1277
STEP = 256 << 20
EDGE = 16 << 20  # partition tables and superblocks live at both ends


def erase(ctx: JobContext) -> Outcome:
    mode = ctx.assignment.params.erase_mode
    try:
        disk = choose_disk(ctx)
    except (HintError, SelectionError) as exc:
        return failed(f"disk selection: {exc}")
    try:
        target = open_target(disk.path, 0)
    except WriteError as exc:
        return failed(str(exc), disk.path)
    try:
        size = target.size
        if mode is p.EraseMode.DISCARD:
            ctx.stage(f"discarding {disk.path} ({human_bytes(size)})")
            try:
                fcntl.ioctl(target.fd, BLKDISCARD, struct.pack("QQ", 0, size))
            except OSError as exc:
                ctx.warn(f"discard not supported on {disk.path} ({exc.strerror}); zeroing instead")
                mode = p.EraseMode.ZERO
            else:
                # discard alone is never trusted to zero: make sure both ends read as zeros
                for offset in (0, max(0, size - EDGE)):
                    _zero(target, offset, min(EDGE, size))
        if mode is p.EraseMode.ZERO:
            ctx.stage(f"zeroing {disk.path} ({human_bytes(size)})")
            for offset in range(0, size, STEP):
                if ctx.cancel.is_set():
                    return failed(f"erase of {disk.path} cancelled at {offset} bytes", disk.path)
                _zero(target, offset, min(STEP, size - offset))
                ctx.progress(f"zeroed {human_bytes(offset + min(STEP, size - offset))}", offset, size)
        os.fsync(target.buffered_fd)
        os.fsync(target.fd)
    finally:
        target.close()
    return Outcome(p.JobResult(p.Outcome.SUCCEEDED, f"{disk.path} erased ({mode.value})", disk.path))


def _zero(target: OpenTarget, offset: int, length: int) -> None:
    try:
        if not target.is_block:
            raise OSError("not a block device")
        blockdev.zeroout(target.fd, offset, length)
    except OSError:
        fd = target.buffered_fd  # plain writes from an unaligned buffer
        zeros = bytes(min(length, 4 << 20))
        done = 0
        while done < length:
            done += os.pwrite(fd, zeros[: length - done], offset + done)


def inventory(ctx: JobContext) -> Outcome:
    inv = ctx.machine.inventory()
    ctx.post_inventory(inv)
    return Outcome(
        p.JobResult(
            p.Outcome.SUCCEEDED, f"{len(inv.disks)} disks, {len(inv.nics)} NICs, {inv.memory.total} bytes"
        )
    )


def reboot(ctx: JobContext) -> Outcome:
    action = ctx.assignment.params.power
    return Outcome(p.JobResult(p.Outcome.SUCCEEDED, f"{action.value} requested"), then=action)
