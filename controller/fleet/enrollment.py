"""Boot and enrollment: who gets an enrollment token, and who may turn one into an agent token.

Each check is one of docs/trust.md's: the boot script's token is bound to the MAC and to the
address that fetched it (and, when sledge runs DHCP, that must be the MAC's lease); with
discovery closed only an expected MAC or one with work gets a token; a registration whose
hardware differs from the machine's bound fingerprint puts the machine in `quarantined`, where
it is given no job until an operator accepts; failures are counted per MAC and per address and
refused past a limit. The pure parts are in controller.trust; this module does the transactions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.hardware.model import Inventory
from agent.protocol import EventKind, RegisterReply, RegisterRequest, identity
from controller import auth, jobs
from controller.fleet.agents import Policy, machine_event, new_id
from controller.fleet.errors import Denied
from controller.jobs import MachineState
from controller.state.model import InventoryRecord, Machine, Quarantine, Token, TokenKind
from controller.state.store import Store, Tx
from controller.trust import Discovery, Refusal, address_refusal
from controller.trust.fingerprint import Fingerprint, changes, fingerprint
from controller.trust.leases import Leases
from controller.trust.limits import FailureLimiter


class EnrollmentDenied(Denied):
    """A refused enrollment; `reason` labels the failure metric."""

    def __init__(self, reason: Refusal, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class BootDecision:
    """The iPXE answer: an enrollment token (boot the agent), or none and why (`exit` to the disk)."""

    machine_id: str | None
    enrollment_token: str | None
    note: str  # what the script echoes
    refusal: Refusal | None = None
    kernel_args: str = ""  # the machine's own (`sledge machine set --kernel-args`)


class Enrollment:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        limiter: FailureLimiter,
        leases: Leases | None = None,
        clock: Callable[[], float] = time.time,
        notify: Callable[[str], None] = lambda machine_id: None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.limiter = limiter
        self.leases = leases  # None: sledge runs no DHCP, so there is no lease to check
        self.clock = clock
        self.notify = notify

    def _leased(self, mac: str) -> str | None:
        return self.leases.address(mac) if self.leases is not None else None

    # -- boot ----------------------------------------------------------------------------------------

    def boot(self, mac: str, peer: str) -> BootDecision:
        """The iPXE decision for a MAC asked from `peer`; a machine never seen becomes `discovered`
        (with discovery open)."""
        now = self.clock()
        refused = address_refusal(mac, peer, None, self._leased(mac), self.leases is not None)
        if refused is not None:
            return BootDecision(None, None, f"{refused[1]}; booting from disk", refused[0])
        closed = self.policy.discovery is Discovery.CLOSED
        with self.store.transaction() as tx:
            machine = tx.machine_by_mac(mac)
            if machine is None and closed:
                return BootDecision(
                    None,
                    None,
                    f"MAC {mac} is not expected (discovery closed); booting from disk",
                    Refusal.DISCOVERY_CLOSED,
                )
            if machine is None:
                machine = Machine(new_id("m"), MachineState.DISCOVERED, (mac,), created_at=now)
            machine = replace(machine, last_seen=now)
            tx.put_machine(machine)
            tx.delete_expired_tokens(now)
            has_job = tx.next_job(machine.id) is not None
            if jobs.boots_from_disk(machine.state, has_job):
                return BootDecision(machine.id, None, f"machine {machine.id} is deployed, booting from disk")
            if closed and not has_job and not machine.expected:
                return BootDecision(
                    machine.id,
                    None,
                    f"machine {machine.id} has no job and is not expected (discovery closed);"
                    " booting from disk",
                    Refusal.DISCOVERY_CLOSED,
                )
            tx.delete_enrollment_tokens(mac, peer)  # one live token per MAC and address
            token = auth.new_token(auth.ENROLLMENT_PREFIX)
            tx.put_token(
                Token(
                    token.id,
                    TokenKind.ENROLLMENT,
                    token.secret_hash,
                    now,
                    mac=mac,
                    expires_at=now + self.policy.enrollment_ttl,
                    address=peer,
                )
            )
            return BootDecision(
                machine.id, token.text, f"machine {machine.id}, booting the agent", None, machine.kernel_args
            )

    # -- registration --------------------------------------------------------------------------------

    def register(self, request: RegisterRequest, peer: str) -> RegisterReply:
        """Check the token, the address, the rate limit and the MACs; bind or compare the fingerprint.

        A refusal changes nothing but the failure counts. A registration with changed hardware is
        not refused: the machine is quarantined and its agent gets a token that is given no job.
        """
        keys = [("address", peer), ("mac", self._claimed_mac(request))]
        blocked = self.limiter.blocked(keys)
        if blocked is not None:
            raise EnrollmentDenied(
                Refusal.RATE_LIMITED,
                f"enrollment: {blocked.key} had {blocked.failures} failed enrollments recently;"
                f" expected fewer, retry in {blocked.retry_after:.0f}s",
                blocked.retry_after,
            )
        try:
            return self._register(request, peer)
        except EnrollmentDenied:
            self.limiter.fail(keys)
            raise

    def _claimed_mac(self, request: RegisterRequest) -> str:
        """The MAC a registration counts against: its token's, else the first its inventory names
        (one MAC only, so a single request cannot spend the failures of many)."""
        try:
            token_id, _ = auth.parse_token(
                request.enrollment_token, auth.ENROLLMENT_PREFIX, "enrollment token"
            )
        except auth.AuthError:
            token_id = ""
        with self.store.transaction() as tx:
            token = tx.token(token_id) if token_id else None
        if token is not None and token.mac:
            return token.mac
        return identity(request.inventory)[1][0]

    def _register(self, request: RegisterRequest, peer: str) -> RegisterReply:
        now = self.clock()
        try:
            token_id, secret = auth.parse_token(
                request.enrollment_token, auth.ENROLLMENT_PREFIX, "enrollment token"
            )
        except auth.AuthError as exc:
            raise EnrollmentDenied(Refusal.TOKEN, str(exc)) from None
        uuid, macs = identity(request.inventory)
        with self.store.transaction() as tx:
            token = self._valid_token(tx, token_id, secret, macs, now)
            assert token.mac is not None  # an enrollment token always names its MAC
            refused = address_refusal(
                token.mac, peer, token.address, self._leased(token.mac), self.leases is not None
            )
            if refused is not None:
                raise EnrollmentDenied(*refused)
            tx.put_token(replace(token, used_at=now))
            machine = self._find(tx, uuid, macs, now)
            machine = self._admit(tx, machine, request.inventory, peer, now)
            tx.delete_tokens(machine.id, TokenKind.AGENT)
            agent_token = auth.new_token(auth.AGENT_PREFIX)
            tx.put_token(Token(agent_token.id, TokenKind.AGENT, agent_token.secret_hash, now, machine.id))
        self.notify(machine.id)
        return RegisterReply(
            machine.id, agent_token.text, self.policy.heartbeat_seconds, self.policy.poll_seconds
        )

    @staticmethod
    def _valid_token(tx: Tx, token_id: str, secret: str, macs: tuple[str, ...], now: float) -> Token:
        token = tx.token(token_id)
        if (
            token is None
            or token.kind is not TokenKind.ENROLLMENT
            or not auth.secret_matches(secret, token.secret_hash)
        ):
            raise EnrollmentDenied(
                Refusal.TOKEN, "enrollment token: unknown (expected one from this controller's boot script)"
            )
        if token.used_at is not None:
            raise EnrollmentDenied(
                Refusal.TOKEN,
                f"enrollment token {token_id}: already used; boot the machine again for a new one",
            )
        if token.expires_at is not None and token.expires_at < now:
            raise EnrollmentDenied(
                Refusal.TOKEN,
                f"enrollment token {token_id}: expired {now - token.expires_at:.0f}s ago; reboot",
            )
        if token.mac not in macs:
            raise EnrollmentDenied(
                Refusal.TOKEN,
                f"enrollment token {token_id}: issued to MAC {token.mac}, not to this machine {macs}",
            )
        return token

    @staticmethod
    def _find(tx: Tx, uuid: str, macs: tuple[str, ...], now: float) -> Machine:
        """The machine this registration speaks for; a MAC of another registered machine is refused
        (it would move that machine's boots here)."""
        machine = (tx.machine_by_uuid(uuid) if uuid else None) or next(
            (m for m in map(tx.machine_by_mac, macs) if m is not None), None
        )
        if machine is None:
            machine = Machine(new_id("m"), MachineState.DISCOVERED, macs, created_at=now)
        for mac in macs:
            other = tx.machine_by_mac(mac)
            if other is None or other.id == machine.id:
                continue
            if other.state is not MachineState.DISCOVERED:
                raise EnrollmentDenied(
                    Refusal.MAC_CONFLICT,
                    f"enrollment: inventory lists MAC {mac}, which belongs to {other.label} ({other.state});"
                    f" expected MACs of {machine.label} or new ones"
                    " (delete the other machine if the NIC moved)",
                )
            tx.delete_machine(other.id)  # the `discovered` stub its boot created joins this machine
        return machine

    def _admit(self, tx: Tx, machine: Machine, inventory: Inventory, peer: str, now: float) -> Machine:
        """Bind the fingerprint at the first registration; quarantine on a difference."""
        seen = fingerprint(inventory)
        bound = machine.fingerprint or (fingerprint(machine.inventory) if machine.inventory else None)
        if machine.state is MachineState.QUARANTINED or (bound is not None and seen != bound):
            assert bound is not None
            return self._quarantine(tx, machine, bound, seen, inventory, peer, now)
        _, macs = identity(inventory)
        machine = replace(
            machine,
            state=jobs.machine_on_register(machine.state),
            macs=macs,
            system_uuid=seen.system_uuid,
            hostname=inventory.system.hostname or machine.hostname,
            inventory=inventory,
            fingerprint=seen,
            expected=False,
            last_seen=now,
        )
        tx.put_machine(machine)
        tx.add_inventory(InventoryRecord(machine.id, now, inventory))
        return machine

    @staticmethod
    def _quarantine(
        tx: Tx,
        machine: Machine,
        bound: Fingerprint,
        seen: Fingerprint,
        inventory: Inventory,
        peer: str,
        now: float,
    ) -> Machine:
        previous = machine.quarantine.previous_state if machine.quarantine else machine.state
        held = Quarantine(seen, inventory, previous, now, peer)
        machine = replace(machine, state=MachineState.QUARANTINED, quarantine=held, last_seen=now)
        tx.put_machine(machine)
        diff = "; ".join(changes(bound, seen)) or "no change (held until accepted)"
        machine_event(
            tx,
            machine.id,
            now,
            EventKind.WARNING,
            f"quarantined: registration from {peer} with hardware unlike the bound fingerprint;"
            f" changed: {diff}; bound: {bound}; seen: {seen};"
            f" no jobs until `sledge machine accept {machine.macs[0] if machine.macs else machine.id}`",
        )
        return machine
