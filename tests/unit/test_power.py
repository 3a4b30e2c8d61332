"""controller.power: addresses, sealed passwords, and the power service against a fake BMC
(the real drivers meet real emulators in tests/integration/test_power_emulators.py)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from agent.protocol import JobKind, JobParams
from controller.fleet.agents import Fleet, Policy
from controller.fleet.operators import Operations
from controller.jobs import JobState, MachineState
from controller.power import vault
from controller.power.address import BmcAddress, Protocol, parse
from controller.power.bmc import FakeBmc, PowerAction
from controller.power.errors import BmcAddressError, BmcError, PowerError, VaultError
from controller.power.service import Power, PowerPolicy
from controller.state.memory import MemoryStore
from controller.state.model import Machine, PowerState
from controller.state.sqlite import SqliteStore
from controller.state.store import Store
from tests.unit.test_controller_kit import AioClient, start

SYSTEM = "/redfish/v1/Systems/27946b59-9e44-4fa7-8e91-f3527a1ef094"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"redfish://10.0.0.5{SYSTEM}", BmcAddress(Protocol.REDFISH, "10.0.0.5", 80, SYSTEM)),
        (
            f"redfish+https://bmc-7.lab:8443{SYSTEM}",
            BmcAddress(Protocol.REDFISH, "bmc-7.lab", 8443, SYSTEM, True),
        ),
        ("ipmi://10.0.0.6", BmcAddress(Protocol.IPMI, "10.0.0.6", 623)),
        ("ipmi://[fd00::6]:6230", BmcAddress(Protocol.IPMI, "fd00::6", 6230)),
    ],
)
def test_addresses_an_operator_writes_parse(text: str, expected: BmcAddress) -> None:
    assert parse(text) == expected
    assert parse(str(expected)) == expected  # what is stored and shown parses back the same


@pytest.mark.parametrize(
    "text",
    [
        "http://10.0.0.5/redfish/v1/Systems/1",  # not a BMC scheme
        "redfish://10.0.0.5/redfish/v1/Managers/1",  # not a system
        "redfish://10.0.0.5/redfish/v1/Systems/../../etc",
        "redfish://admin:pw@10.0.0.5/redfish/v1/Systems/1",  # credentials would be shown with it
        "ipmi://10.0.0.6/x",
        "ipmi://10.0.0.6:99999",
        "ipmi://bad host",
        "ipmi://-x",
        "ipmi://10.0.0.6?x=1",
        "ipmi://" + "a" * 600,
    ],
)
def test_addresses_that_are_not_a_bmc_are_refused_by_name(text: str) -> None:
    with pytest.raises(BmcAddressError, match="BMC address"):
        parse(text)


def test_a_sealed_password_opens_only_for_its_machine_and_key(tmp_path: Path) -> None:
    keys = vault.load(tmp_path)
    assert os.stat(tmp_path / vault.KEY_FILE).st_mode & 0o777 == 0o600
    sealed = keys.seal("Planted-Secret-77", "m-1")
    assert "Planted-Secret-77" not in sealed and sealed != keys.seal(
        "Planted-Secret-77", "m-1"
    )  # fresh nonce
    assert vault.load(tmp_path).open(sealed, "m-1") == "Planted-Secret-77"
    with pytest.raises(VaultError, match="machine m-2: does not open"):
        keys.open(sealed, "m-2")  # copied onto another machine's record
    tampered = sealed[:-6] + ("AAAA==" if not sealed.endswith("AAAA==") else "BBBB==")
    with pytest.raises(VaultError, match="does not open"):
        keys.open(tampered, "m-1")


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    vault.load(tmp_path)
    os.chmod(tmp_path / vault.KEY_FILE, 0o644)
    with pytest.raises(VaultError, match="expected mode 600, found 644"):
        vault.load(tmp_path)
    (tmp_path / vault.KEY_FILE).write_text("junk\n")
    os.chmod(tmp_path / vault.KEY_FILE, 0o600)
    with pytest.raises(VaultError, match="line 1"):
        vault.load(tmp_path)


def test_rotation_keeps_old_seals_open_until_the_old_key_is_dropped(tmp_path: Path) -> None:
    old = vault.load(tmp_path)
    sealed = old.seal("pw", "m-1")
    both = vault.add_key(tmp_path)
    assert both.keys[1:] == old.keys and both.open(sealed, "m-1") == "pw"
    resealed = both.seal("pw", "m-1")
    new = vault.keep_only_first(tmp_path)
    assert new.open(resealed, "m-1") == "pw"
    with pytest.raises(VaultError, match="no longer holds"):
        new.open(sealed, "m-1")


# -- the service -------------------------------------------------------------------------------------


def machine(store: Store, mid: str, state: MachineState = MachineState.DEPLOYED) -> Machine:
    m = Machine(mid, state, (f"52:54:00:00:00:{len(mid):02x}",))
    with store.transaction() as tx:
        tx.put_machine(m)
    return m


def power_for(store: Store, tmp_path: Path, fakes: dict[str, FakeBmc], **policy: float) -> Power:
    def connect(address: BmcAddress, user: str, password: str, timeout: float) -> FakeBmc:
        assert password == "Planted-Secret-77"  # the sealed password, opened for the call
        return fakes[str(address)]

    return Power(store, tmp_path, PowerPolicy(**policy), connector=connect)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "state.db")


async def test_power_actions_go_to_the_bmc_and_into_the_record(store: Store, tmp_path: Path) -> None:
    machine(store, "m-1")
    fake = FakeBmc("ipmi://10.0.0.6:623")
    power = power_for(store, tmp_path, {fake.name: fake})
    _, record = power.set_bmc("m-1", "ipmi://10.0.0.6", "admin", "Planted-Secret-77")
    assert "Planted-Secret-77" not in repr(record) and record.sealed_password.startswith("v1:")
    assert (await power.act("m-1", PowerAction.ON)).power is PowerState.ON
    fake.state = PowerState.OFF  # someone pulled the plug: status asks, it does not guess
    assert (await power.act("m-1", PowerAction.STATUS)).power is PowerState.OFF
    assert fake.calls == ["on", "status"]
    fake.fail = "Insufficient privilege level"
    with pytest.raises(BmcError, match=r"BMC ipmi://10.0.0.6:623: power off: Insufficient privilege level"):
        await power.act("m-1", PowerAction.OFF)
    _, record = power.record("m-1")
    assert record.power is PowerState.UNKNOWN and record.power_error == "Insufficient privilege level"
    await power.close()


async def test_a_bmc_that_hangs_holds_only_its_own_machine(store: Store, tmp_path: Path) -> None:
    for mid in ("m-1", "m-2"):
        machine(store, mid)
    stuck = FakeBmc("ipmi://10.0.0.1:623", hang=threading.Event())
    fine = FakeBmc("ipmi://10.0.0.2:623", state=PowerState.ON)
    power = power_for(store, tmp_path, {stuck.name: stuck, fine.name: fine}, call_timeout=0.3)
    power.set_bmc("m-1", stuck.name, "admin", "Planted-Secret-77")
    power.set_bmc("m-2", fine.name, "admin", "Planted-Secret-77")
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        power.act("m-1", PowerAction.STATUS), power.act("m-2", PowerAction.STATUS), return_exceptions=True
    )
    assert isinstance(results[0], BmcError) and "no answer within 0.3 s" in str(results[0])
    assert not isinstance(results[1], BaseException) and results[1].power is PowerState.ON
    assert loop.time() - started < 2.0
    # while its worker is still stuck, the machine takes no second request (no pile-up of threads)
    with pytest.raises(BmcError, match="still in progress"):
        await power.act("m-1", PowerAction.STATUS)
    assert stuck.hang is not None
    stuck.hang.set()
    await power.close()


def test_polling_is_bounded_and_spread(tmp_path: Path) -> None:
    store = MemoryStore()
    for i in range(50):
        machine(store, f"m-{i}")
    power = power_for(store, tmp_path, {}, poll_interval=60.0)
    for i in range(50):
        power.set_bmc(f"m-{i}", f"ipmi://10.0.1.{i}", "admin", "Planted-Secret-77")
    records = power.records()
    polls: dict[str, list[float]] = {k: [] for k in records}
    t = 1000.0
    while t < 1000.0 + 600:  # ten minutes, looked at every 5 s as the poller does
        for record in power.due(records, t):
            polls[record.machine_id].append(t)
        t += 5.0
    counts = [len(v) for v in polls.values()]
    assert max(counts) <= 11 and min(counts) >= 8  # about once a minute each, never more than ~1.1/min
    firsts = sorted(v[0] for v in polls.values())
    assert firsts[-1] - firsts[0] > 30  # a start does not ask every BMC at once


class Harness:
    def __init__(self, store: Store, tmp_path: Path, fake: FakeBmc, **policy: float) -> None:
        self.store = store
        self.ops = Operations(store)
        self.fleet = Fleet(store, Policy())
        self.power = power_for(store, tmp_path, {fake.name: fake}, **policy)

    def job(self, kind: JobKind = JobKind.ERASE) -> str:
        return self.ops.create_job("m-1", kind, JobParams()).id

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.ops.events(job_id)]


async def test_a_deployed_machine_is_booted_to_its_agent_for_a_job(store: Store, tmp_path: Path) -> None:
    machine(store, "m-1", MachineState.DEPLOYED)
    fake = FakeBmc("ipmi://10.0.0.6:623", state=PowerState.ON)
    h = Harness(store, tmp_path, fake, boot_deadline=5.0)
    h.power.set_bmc("m-1", fake.name, "admin", "Planted-Secret-77")
    job_id = h.job()
    task = asyncio.create_task(h.power.boot_for_job(job_id))
    while not any("waiting" in m for m in h.messages(job_id)):
        await asyncio.sleep(0.01)
    assert fake.calls == ["pxe-once", "cycle"]  # the boot device first, then the cycle
    assert h.fleet.claim("m-1") is not None  # the agent comes up and claims it
    await asyncio.wait_for(task, 3)
    assert h.ops.job(job_id).state is JobState.RUNNING
    messages = h.messages(job_id)
    assert [m.split(" via ")[0].split(" up to ")[0] for m in messages if m.startswith("power")] == [
        "power: one-time network boot",
        "power: cycle",
        "power: waiting",
    ], messages
    await h.power.close()


async def test_an_off_machine_is_powered_on_and_a_running_agent_is_left_alone(
    store: Store, tmp_path: Path
) -> None:
    machine(store, "m-1", MachineState.READY)
    fake = FakeBmc("ipmi://10.0.0.6:623", state=PowerState.ON)
    h = Harness(store, tmp_path, fake, boot_deadline=0.2)
    h.power.set_bmc("m-1", fake.name, "admin", "Planted-Secret-77")
    first = h.job()
    await h.power.boot_for_job(first)
    assert fake.calls == ["status"] and h.ops.job(first).state is JobState.QUEUED  # on: its agent is there
    h.ops.cancel_job(first)
    fake.state = PowerState.OFF
    second = h.job()
    await h.power.boot_for_job(second)
    assert fake.calls[1:] == ["status", "pxe-once", "cycle"]
    assert any("the machine is off" in m for m in h.messages(second))


async def test_a_failing_bmc_ends_the_job_with_its_words_and_the_machine_as_it_was(
    store: Store, tmp_path: Path
) -> None:
    machine(store, "m-1", MachineState.DEPLOYED)
    fake = FakeBmc("ipmi://10.0.0.6:623", fail="Error: Unable to establish IPMI v2 / RMCP+ session")
    h = Harness(store, tmp_path, fake)
    h.power.set_bmc("m-1", fake.name, "admin", "Planted-Secret-77")
    job_id = h.job(JobKind.ERASE)
    await h.power.boot_for_job(job_id)
    job = h.ops.job(job_id)
    assert job.state is JobState.FAILED
    assert job.status.reason == (
        "BMC ipmi://10.0.0.6:623: set one-time network boot:"
        " Error: Unable to establish IPMI v2 / RMCP+ session"
    )
    assert h.ops.machine("m-1").state is MachineState.DEPLOYED  # its disk was never touched
    _, record = h.power.record("m-1")
    assert record.power is PowerState.UNKNOWN and "RMCP+" in record.power_error


async def test_no_agent_within_the_deadline_fails_the_job(store: Store, tmp_path: Path) -> None:
    machine(store, "m-1", MachineState.DEPLOYED)
    fake = FakeBmc("ipmi://10.0.0.6:623", state=PowerState.ON)
    h = Harness(store, tmp_path, fake, boot_deadline=0.3)
    h.power.set_bmc("m-1", fake.name, "admin", "Planted-Secret-77")
    job_id = h.job()
    await asyncio.wait_for(h.power.boot_for_job(job_id), 3)
    job = h.ops.job(job_id)
    assert job.state is JobState.FAILED
    assert job.status.reason == (
        "no agent claimed the job within 0.3 s of the power cycle via ipmi://10.0.0.6:623"
    )
    assert h.ops.machine("m-1").state is MachineState.DEPLOYED
    assert h.fleet.claim("m-1") is None  # nothing left queued for a late agent


async def test_a_requeued_job_boots_the_machine_to_a_new_agent_even_though_it_is_on(
    store: Store, tmp_path: Path
) -> None:
    machine(store, "m-1", MachineState.READY)
    fake = FakeBmc("ipmi://10.0.0.6:623", state=PowerState.ON)
    h = Harness(store, tmp_path, fake, boot_deadline=5.0)
    h.power.set_bmc("m-1", fake.name, "admin", "Planted-Secret-77")
    job_id = h.job(JobKind.ERASE)
    await h.power.boot_for_job(job_id)
    assert fake.calls == ["status"]  # on and not deployed: its agent is there, left alone
    h.power.job_requeued(job_id)  # ...and then vanished: the lease ran out, the job is queued again
    while not any("waiting" in m for m in h.messages(job_id)):
        await asyncio.sleep(0.01)
    assert fake.calls == ["status", "pxe-once", "cycle"]  # "it is on" is not trusted this time
    steps = [m.split(" via ")[0].split(" (")[0] for m in h.messages(job_id) if m.startswith("power")]
    assert steps == [
        "power: the agent was lost; booting a new one",
        "power: one-time network boot",
        "power: cycle",
        "power: waiting up to 5 s for the agent",
    ], steps
    assert h.fleet.claim("m-1") is not None
    await h.power.close()


async def test_an_agent_that_comes_back_before_the_cycle_is_not_reset(store: Store, tmp_path: Path) -> None:
    machine(store, "m-1", MachineState.READY)
    fake = FakeBmc("ipmi://10.0.0.6:623", state=PowerState.ON, hang=threading.Event())
    h = Harness(store, tmp_path, fake, boot_deadline=5.0)
    h.power.set_bmc("m-1", fake.name, "admin", "Planted-Secret-77")
    job_id = h.job(JobKind.ERASE)
    task = asyncio.create_task(h.power.boot_for_job(job_id, agent_lost=True))
    while fake.calls != ["pxe-once"]:
        await asyncio.sleep(0.01)
    assert h.fleet.claim("m-1") is not None  # the lost agent answers again while the BMC works
    fake.hang.set()  # type: ignore[union-attr]
    await asyncio.wait_for(task, 3)
    assert fake.calls == ["pxe-once"]  # no reset under the agent that has the job
    assert h.ops.job(job_id).state is JobState.RUNNING
    await h.power.close()


async def test_the_lease_reaper_powers_up_a_requeued_job_through_the_bmc(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    fake = FakeBmc("ipmi://10.0.0.6:623", state=PowerState.ON)

    def connect(address: BmcAddress, user: str, password: str, timeout: float) -> FakeBmc:
        return fake

    h = await start(
        aiohttp_client, tmp_path, app_args={"bmc_connector": connect}, lease_seconds=10.0, reap_interval=0.05
    )
    machine_id = await h.enroll()
    r = await h.client.put(
        f"/v1/machines/{machine_id}/bmc",
        json={"address": fake.name, "username": "admin", "password": "Planted-Secret-77"},
        headers=h.op,
    )
    assert r.status == 201, await r.text()
    job = await h.create_job(machine_id, "erase")
    assert await h.claim(machine_id) is not None  # the agent that was there claims it
    assert "pxe-once" not in fake.calls
    h.clock.now += 25  # and goes silent
    for _ in range(200):
        shown = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
        if any("waiting" in e["message"] for e in shown["events"]):
            break
        await asyncio.sleep(0.02)
    assert shown["state"] == "queued" and shown["reason"].endswith("; re-queued"), shown
    assert [c for c in fake.calls if c != "status"] == ["pxe-once", "cycle"]  # (a poll may slip in)
    messages = [e["message"] for e in shown["events"]]
    assert any(m.startswith("power: the agent was lost") for m in messages), messages
    again = await h.claim(machine_id)  # the new agent
    assert again is not None and again["attempt"] == 2


def test_a_bmc_record_needs_a_user_and_a_password(tmp_path: Path) -> None:
    store = MemoryStore()
    machine(store, "m-1")
    power = power_for(store, tmp_path, {})
    with pytest.raises(PowerError, match="BMC user"):
        power.set_bmc("m-1", "ipmi://10.0.0.6", "", "pw")
    with pytest.raises(PowerError, match="BMC password"):
        power.set_bmc("m-1", "ipmi://10.0.0.6", "admin", "two\nlines")


async def test_the_poller_keeps_the_record_current_at_its_rate_and_survives_a_dead_bmc(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    for mid in ("m-1", "m-2"):
        machine(store, mid)
    up = FakeBmc("ipmi://10.0.0.1:623", state=PowerState.ON)
    dead = FakeBmc("ipmi://10.0.0.2:623", fail="Error: Unable to establish IPMI v2 / RMCP+ session")
    power = power_for(store, tmp_path, {up.name: up, dead.name: dead}, poll_interval=0.5, tick=0.05)
    power.set_bmc("m-1", up.name, "admin", "Planted-Secret-77")
    power.set_bmc("m-2", dead.name, "admin", "Planted-Secret-77")
    task = asyncio.create_task(power.poll_loop())
    await asyncio.sleep(3.0)
    task.cancel()
    await power.close()
    records = power.records()
    assert records["m-1"].power is PowerState.ON and records["m-1"].power_error == ""
    assert records["m-2"].power is PowerState.UNKNOWN and "RMCP+" in records["m-2"].power_error
    # 3 s at one poll per 0.5 s (jittered, first within the first interval): 5-7 each, never more
    assert 4 <= len(up.calls) <= 7 and 4 <= len(dead.calls) <= 7, (up.calls, dead.calls)


def test_ipmi_remembers_the_cipher_suite_a_bmc_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BMC without suite 17 refuses it once; later calls go straight to suite 3 (one session
    per poll, not two). ipmitool here is a stand-in that logs its arguments."""
    from controller.power.ipmi import IpmiBmc

    tool = tmp_path / "ipmitool"
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        'case "$*" in *"-C 17 "*) echo "Error in open session response message :'
        ' invalid authentication algorithm" >&2; exit 1;; esac\n'
        "echo 'Chassis Power is on'\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    address = parse("ipmi://10.0.0.99:6231")
    for _ in range(3):  # a driver per call, as the service makes them
        assert IpmiBmc(address, "admin", "pw", 5.0).power_state() is PowerState.ON
    suites = [line.split("-C ")[1].split()[0] for line in (tmp_path / "calls").read_text().splitlines()]
    assert suites == ["17", "3", "3", "3"]
