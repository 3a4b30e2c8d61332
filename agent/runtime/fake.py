"""An in-memory controller behind the Transport interface, for tests of the job loop.

It keeps what a controller keeps (machines, jobs, events by seq, results) and can
be told to be down, so the loop's outage handling runs without a server.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass, field

from agent import protocol as p
from agent.hardware.model import Inventory
from agent.runtime.transport import Conflict, Rejected, TransportError, Unauthorized


@dataclass
class FakeJob:
    assignment: p.Assignment
    events: list[p.Event] = field(default_factory=list)
    result: p.JobResult | None = None
    cancelled: bool = False


class FakeTransport:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down = False
        self.enrollment_tokens: set[str] = {"enroll-1"}
        self.agent_tokens: set[str] = set()
        self.queue: deque[p.Assignment] = deque()
        self.jobs: dict[str, FakeJob] = {}
        self.inventories: list[Inventory] = []
        self.calls: list[str] = []
        self.failed_calls = 0

    def _enter(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)
            if self.down:
                self.failed_calls += 1
                raise TransportError(f"{name}: connection refused (fake controller is down)")

    def _auth(self, token: str) -> None:
        if token not in self.agent_tokens:
            raise Unauthorized("agent token refused")

    def add_job(self, kind: p.JobKind, params: p.JobParams | None = None) -> str:
        job_id = f"j-{secrets.token_hex(6)}"
        assignment = p.Assignment(job_id, kind, 1, 1, 60.0, params or p.JobParams())
        with self.lock:
            self.queue.append(assignment)
            self.jobs[job_id] = FakeJob(assignment)
        return job_id

    def register(self, request: p.RegisterRequest) -> p.RegisterReply:
        self._enter("register")
        with self.lock:
            if request.enrollment_token not in self.enrollment_tokens:
                raise Unauthorized("enrollment token used, expired or unknown")
            self.enrollment_tokens.discard(request.enrollment_token)
            token = secrets.token_hex(16)
            self.agent_tokens.add(token)
            self.inventories.append(request.inventory)
        return p.RegisterReply("m-000000000001", token, 0.2, 1.0)

    def heartbeat(self, token: str, beat: p.Heartbeat) -> p.HeartbeatReply:
        self._enter("heartbeat")
        self._auth(token)
        with self.lock:
            cancel = tuple(j for j, job in self.jobs.items() if job.cancelled and job.result is None)
        return p.HeartbeatReply(cancel)

    def next_job(self, token: str, wait: float) -> p.Assignment | None:
        self._enter("next_job")
        self._auth(token)
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def post_events(self, token: str, job_id: str, batch: p.EventBatch) -> p.EventAck:
        self._enter("post_events")
        self._auth(token)
        with self.lock:
            job = self.jobs[job_id]
            have = len(job.events) + 1
            for event in batch.events:
                if event.seq == have:
                    job.events.append(event)
                    have += 1
                elif event.seq > have:
                    raise Conflict(f"events: expected seq {have}, got {event.seq}")
            return p.EventAck(have)

    def finish(self, token: str, job_id: str, request: p.FinishRequest) -> None:
        self._enter("finish")
        self._auth(token)
        with self.lock:
            self.jobs[job_id].result = request.result

    def post_inventory(self, token: str, inventory: Inventory) -> None:
        self._enter("post_inventory")
        self._auth(token)
        with self.lock:
            self.inventories.append(inventory)

    def boot_script(self, mac: str) -> str:
        self._enter("boot_script")
        token = f"enroll-{secrets.token_hex(4)}"
        with self.lock:
            self.enrollment_tokens.add(token)
        return f"#!ipxe\nkernel http://c/boot/vmlinuz sledge.controller=http://c sledge.token={token}\nboot\n"

    def announce(self, token: str, message: p.Announce) -> p.AnnounceReply:
        """No tracker here: a deploy with peers enabled falls back to its sources alone."""
        self._enter("announce")
        self._auth(token)
        raise Rejected("the fake transport has no tracker")
