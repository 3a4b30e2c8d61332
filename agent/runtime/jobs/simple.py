"""inventory and reboot."""

from __future__ import annotations

from agent import protocol as p
from agent.runtime.jobs import JobContext, Outcome


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
