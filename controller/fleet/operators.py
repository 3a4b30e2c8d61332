"""Operator operations: machines, images, jobs and events; each one transaction."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from agent.protocol import DiskHints, EventKind, JobKind, JobParams, ProtocolError, identity, normalize_mac
from controller import jobs
from controller.fleet.agents import controller_event, end_job, machine_event, new_id
from controller.fleet.errors import Conflict, Invalid, NotFound
from controller.jobs import JobState, JobStatus, MachineState
from controller.state.model import BmcRecord, Counts, EventRecord, Image, InventoryRecord, Job, Machine
from controller.state.store import Store, Tx
from controller.trust.fingerprint import changes, fingerprint

MAX_LIST = 1000


def find_machine(tx: Tx, ref: str) -> Machine:
    """A machine by id, MAC or hostname."""
    machine = tx.machine(ref)
    if machine is None:
        try:
            machine = tx.machine_by_mac(normalize_mac(ref))
        except ProtocolError:
            named = [m for m in tx.machines() if m.hostname == ref]
            if len(named) > 1:
                raise Invalid(
                    f"machine {ref!r}: {len(named)} machines have that hostname; use an id"
                ) from None
            machine = named[0] if named else None
    if machine is None:
        raise NotFound(f"machine {ref!r}: no machine with that id, MAC or hostname")
    return machine


class Operations:
    def __init__(
        self,
        store: Store,
        max_attempts: int = jobs.DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        notify: Callable[[str], None] = lambda machine_id: None,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.clock = clock
        self.notify = notify

    # -- machines ------------------------------------------------------------------------------------

    def machines(self) -> list[Machine]:
        with self.store.transaction() as tx:
            return tx.machines()

    def machine(self, ref: str) -> Machine:
        with self.store.transaction() as tx:
            return find_machine(tx, ref)

    def bmc(self, machine_id: str) -> BmcRecord | None:
        with self.store.transaction() as tx:
            return tx.bmc(machine_id)

    def inventory_history(self, ref: str, limit: int = 50) -> list[InventoryRecord]:
        with self.store.transaction() as tx:
            return tx.inventory_history(find_machine(tx, ref).id, limit)

    def set_desired(
        self, ref: str, image: str | None, disk: DiskHints | None, kernel_args: str | None = None
    ) -> Machine:
        with self.store.transaction() as tx:
            machine = find_machine(tx, ref)
            if image is not None:
                machine = replace(machine, desired_image=image)
            if disk is not None:
                machine = replace(machine, disk_hints=disk)
            if kernel_args is not None:
                machine = replace(machine, kernel_args=kernel_args)
            tx.put_machine(machine)
            return machine

    def accept(self, ref: str) -> Machine:
        """Accept a quarantined machine's new hardware: its fingerprint becomes the bound one."""
        now = self.clock()
        with self.store.transaction() as tx:
            machine = find_machine(tx, ref)
            held = machine.quarantine
            if held is None:
                raise Conflict(
                    f"{machine.label}: expected a quarantined machine to accept, but it is {machine.state}"
                )
            bound = machine.fingerprint or (fingerprint(machine.inventory) if machine.inventory else None)
            diff = "; ".join(changes(bound, held.fingerprint)) if bound else "first fingerprint"
            _, macs = identity(held.inventory)
            for mac in macs:  # a NIC that moved here from a machine the operator deleted meanwhile
                other = tx.machine_by_mac(mac)
                if (
                    other is not None
                    and other.id != machine.id
                    and other.state is not MachineState.DISCOVERED
                ):
                    raise Conflict(
                        f"{machine.label}: its new MAC {mac} belongs to {other.label}; delete that first"
                    )
            machine = replace(
                machine,
                state=jobs.machine_on_register(held.previous_state),
                quarantine=None,
                fingerprint=held.fingerprint,
                macs=macs,
                system_uuid=held.fingerprint.system_uuid,
                hostname=held.inventory.system.hostname or machine.hostname,
                inventory=held.inventory,
            )
            tx.put_machine(machine)
            tx.add_inventory(InventoryRecord(machine.id, now, held.inventory))
            machine_event(
                tx, machine.id, now, EventKind.STAGE, f"accepted by operator: {diff}; now {held.fingerprint}"
            )
        self.notify(machine.id)
        return machine

    def expect(self, mac: str) -> Machine:
        """Let this MAC enroll once with discovery closed (a machine record is made if it has none)."""
        try:
            mac = normalize_mac(mac)
        except ProtocolError as exc:
            raise Invalid(str(exc)) from None
        now = self.clock()
        with self.store.transaction() as tx:
            machine = tx.machine_by_mac(mac) or Machine(
                new_id("m"), MachineState.DISCOVERED, (mac,), created_at=now
            )
            machine = replace(machine, expected=True)
            tx.put_machine(machine)
            return machine

    def machine_events(self, ref: str, limit: int = 20) -> list[EventRecord]:
        with self.store.transaction() as tx:
            return tx.machine_events(find_machine(tx, ref).id, limit)

    def delete_machine(self, ref: str) -> Machine:
        with self.store.transaction() as tx:
            machine = find_machine(tx, ref)
            active = tx.jobs(machine.id, (JobState.RUNNING,), 1)
            if active:
                raise Conflict(f"{machine.label}: job {active[0].id} is running; cancel it first")
            tx.delete_machine(machine.id)
            return machine

    # -- images --------------------------------------------------------------------------------------

    def images(self) -> list[Image]:
        with self.store.transaction() as tx:
            return tx.images()

    def image(self, name: str, version: str) -> Image | None:
        with self.store.transaction() as tx:
            return tx.image(name, version)

    def register_image(self, image: Image) -> Image:
        with self.store.transaction() as tx:
            existing = tx.image(image.name, image.version)
            if existing is not None and existing.digest != image.digest:
                raise Conflict(
                    f"image {image.ref}: registered with manifest {existing.digest}, "
                    f"the store now has {image.digest}; register a new version"
                )
            tx.put_image(existing or image)
            return existing or image

    # -- jobs ----------------------------------------------------------------------------------------

    def create_job(self, machine_ref: str, kind: JobKind, params: JobParams) -> Job:
        try:
            params.validate_for(kind)
        except ProtocolError as exc:
            raise Invalid(str(exc)) from None
        now = self.clock()
        with self.store.transaction() as tx:
            machine = find_machine(tx, machine_ref)
            if kind is JobKind.DEPLOY and params.image_name:
                machine = replace(machine, desired_image=f"{params.image_name}:{params.image_version}")
                tx.put_machine(machine)
            if not params.disk.items and kind in (JobKind.DEPLOY, JobKind.ERASE, JobKind.VERIFY):
                params = replace(params, disk=machine.disk_hints)
            job = Job(
                new_id("j"),
                machine.id,
                kind,
                params,
                JobStatus(JobState.QUEUED, 0, self.max_attempts),
                now,
                now,
            )
            tx.put_job(job)
            controller_event(tx, job, now, EventKind.STAGE, f"queued: {kind} on {machine.label}")
        self.notify(machine.id)
        return job

    def cancel_job(self, job_id: str, who: str = "operator") -> Job:
        now = self.clock()
        with self.store.transaction() as tx:
            job = tx.job(job_id)
            if job is None:
                raise NotFound(f"job {job_id!r}: no such job")
            try:
                status = jobs.cancel(job.id, job.status, who)
            except jobs.TransitionError as exc:
                raise Conflict(str(exc)) from None
            job = end_job(tx, job, status, now, status.reason)
        self.notify(job.machine_id)
        return job

    def jobs(self, machine_ref: str | None, states: Sequence[JobState], limit: int = 100) -> list[Job]:
        with self.store.transaction() as tx:
            machine_id = find_machine(tx, machine_ref).id if machine_ref else None
            return tx.jobs(machine_id, states, min(limit, MAX_LIST))

    def job(self, job_id: str) -> Job:
        with self.store.transaction() as tx:
            job = tx.job(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r}: no such job")
        return job

    def events(self, job_id: str | None, after_id: int = 0, limit: int = MAX_LIST) -> list[EventRecord]:
        with self.store.transaction() as tx:
            if job_id is not None and tx.job(job_id) is None:
                raise NotFound(f"job {job_id!r}: no such job")
            return tx.events(job_id, after_id, min(limit, MAX_LIST))

    def counts(self) -> Counts:
        with self.store.transaction() as tx:
            return tx.counts()
