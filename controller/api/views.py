"""Records as the operator API shows them (plain JSON values)."""

from __future__ import annotations

from typing import Any

from agent.protocol import JobParams
from controller.state.model import EventRecord, Image, InventoryRecord, Job, Machine, Quarantine
from controller.trust.fingerprint import Fingerprint, changes


def machine(m: Machine, detail: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": m.id,
        "state": m.state.value,
        "hostname": m.hostname,
        "macs": list(m.macs),
        "system_uuid": m.system_uuid,
        "desired_image": m.desired_image,
        "disk_hints": m.disk_hints.to_wire(),
        "created_at": m.created_at,
        "last_seen": m.last_seen,
        "expected": m.expected,
    }
    if detail:
        view["inventory"] = m.inventory.to_wire() if m.inventory else None
        view["fingerprint"] = m.fingerprint.to_wire() if m.fingerprint else None
        view["quarantine"] = quarantine(m.quarantine, m.fingerprint) if m.quarantine else None
    return view


def quarantine(q: Quarantine, bound: Fingerprint | None) -> dict[str, Any]:
    """What the operator decides on: the registration's fingerprint, and exactly what changed."""
    return {
        "at": q.at,
        "address": q.address,
        "previous_state": q.previous_state.value,
        "fingerprint": q.fingerprint.to_wire(),
        "changes": changes(bound, q.fingerprint) if bound else [],
    }


def params(p: JobParams) -> dict[str, Any]:
    """Job parameters with the cloud-init seed's contents left out: user-data carries SSH keys,
    passwords and join tokens, and this view ends up in terminals, scripts and their logs. Only
    the machine's trusted agent receives them (in its Assignment)."""
    wire = p.to_wire()
    if p.cloud_init:
        wire["cloud_init"] = {
            k: f"<{len(v.encode())} bytes, not shown>" if v else "" for k, v in p.cloud_init.to_wire().items()
        }
    return wire


def inventory(r: InventoryRecord) -> dict[str, Any]:
    return {"at": r.at, "inventory": r.inventory.to_wire()}


def image(i: Image) -> dict[str, Any]:
    return {
        "name": i.name,
        "version": i.version,
        "digest": i.digest,
        "image_size": i.image_size,
        "data_size": i.data_size,
        "chunks": i.chunks,
        "registered_at": i.registered_at,
    }


def job(j: Job) -> dict[str, Any]:
    s = j.status
    return {
        "id": j.id,
        "machine_id": j.machine_id,
        "kind": j.kind.value,
        "params": params(j.params),
        "state": s.state.value,
        "attempts": s.attempts,
        "max_attempts": s.max_attempts,
        "lease_deadline": s.lease_deadline,
        "reason": s.reason,
        "result": j.result.to_wire() if j.result else None,
        "done": j.done,
        "total": j.total,
        "created_at": j.created_at,
        "updated_at": j.updated_at,
    }


def event(e: EventRecord) -> dict[str, Any]:
    return {
        "id": e.id,
        "job_id": e.job_id,
        "machine_id": e.machine_id,
        "seq": e.seq,
        "at": e.at,
        "source": e.source.value,
        "kind": e.kind.value,
        "message": e.message,
        "done": e.done,
        "total": e.total,
    }
