"""Enrollment as an attacker on the provisioning network would try it: a real aiohttp server on
127.0.0.1, the victim's requests from 127.0.0.1 and the attacker's from a socket bound to 127.0.0.2."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.hardware.model import Inventory
from controller.app import make_app
from controller.auth import ensure_operator_token, operator_token_path
from controller.config import Config
from controller.state.sqlite import SqliteStore
from controller.trust import Discovery
from controller.trust.leases import StaticLeases
from tests.unit.test_controller_kit import AioClient, Clock, Harness, add_image, inventory, start
from tests.unit.test_trust import disk, with_disks

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
ATTACKER = "127.0.0.2"


@asynccontextmanager
async def attacker(h: Harness) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from 127.0.0.2 (loopback, so nothing leaves the machine)."""
    connector = aiohttp.TCPConnector(local_addr=(ATTACKER, 0))
    async with aiohttp.ClientSession(str(h.client.make_url("")), connector=connector) as session:
        yield session


def victim(mac: str = MAC1) -> Inventory:
    return with_disks(inventory(macs=(mac,)), disk("sda", "S1"), disk("sdb", "S2"))


async def token_from(client: Any, mac: str) -> str | None:
    r = await client.get("/boot/ipxe", params={"mac": mac})
    assert r.status == 200
    match = re.search(r"sledge\.token=(\S+)", await r.text())
    return match.group(1) if match else None


async def register(client: Any, token: str, inv: Inventory) -> tuple[int, dict[str, Any]]:
    r = await client.post("/v1/agent/register", json={"enrollment_token": token, "inventory": inv.to_wire()})
    return r.status, await r.json()


async def refusals(h: Harness) -> dict[str, int]:
    text = await (await h.client.get("/metrics")).text()
    return {
        m[0]: int(m[1]) for m in re.findall(r'sledge_enrollment_refusals_total\{reason="(\w+)"\} (\d+)', text)
    }


async def test_a_stolen_enrollment_token_is_refused_from_another_address(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    token = await token_from(h.client, MAC1)  # the victim's boot script (e.g. sniffed: it is plain HTTP)
    assert token
    async with attacker(h) as evil:
        status, body = await register(evil, token, victim())
    assert status == 401
    assert body["error"] == (
        f"enrollment for MAC {MAC1}: from address {ATTACKER}, expected 127.0.0.1"
        " (the address that fetched its boot script)"
    )
    assert (await refusals(h))["address"] == 1
    status, reply = await register(h.client, token, victim())  # the token was not burnt by the attempt
    assert status == 200 and reply["machine_id"].startswith("m-")
    status, body = await register(h.client, token, victim())
    assert status == 401 and "already used" in body["error"]


async def test_a_new_boot_replaces_the_token_from_the_same_address_only(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    first = await token_from(h.client, MAC1)
    async with attacker(h) as evil:
        evil_token = await token_from(evil, MAC1)  # discovery open: the attacker gets its own token
    second = await token_from(h.client, MAC1)
    assert first and second and evil_token
    status, body = await register(h.client, first, victim())
    assert status == 401 and "unknown" in body["error"]
    assert (await register(h.client, second, victim()))[0] == 200  # the attacker's boot did not revoke it


async def test_a_changed_fingerprint_is_quarantined_and_given_no_job(
    aiohttp_client: AioClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start(aiohttp_client, tmp_path)
    add_image(h.config.store_dir, "tiny", "1")
    caplog.set_level(logging.DEBUG)
    token = await token_from(h.client, MAC1)
    assert token
    status, reply = await register(h.client, token, victim())
    assert status == 200
    machine_id, good_agent = reply["machine_id"], reply["agent_token"]
    secret = "#cloud-config\npassword: hunter2-SECRET\n"
    job = await h.create_job(
        machine_id, "deploy", image="tiny:1", params={"cloud_init": {"user_data": secret}}
    )
    r = await h.client.get(
        "/v1/agent/jobs/next", params={"wait": "0"}, headers={"Authorization": f"Bearer {good_agent}"}
    )
    assert (
        r.status == 200 and (await r.json())["params"]["cloud_init"]["user_data"] == secret
    )  # trusted agent
    await h.client.post(f"/v1/jobs/{job['id']}/cancel", headers=h.op)
    job = await h.create_job(
        machine_id, "deploy", image="tiny:1", params={"cloud_init": {"user_data": secret}}
    )

    # the attacker boots as the victim's MAC from its own address: token and address checks pass,
    # but its hardware is not the victim's
    impostor = with_disks(
        inventory(uuid="99999999-0000-0000-0000-000000000000", macs=(MAC1,)), disk("vda", "QM1")
    )
    async with attacker(h) as evil:
        evil_token = await token_from(evil, MAC1)
        assert evil_token
        status, reply = await register(evil, evil_token, impostor)
        assert status == 200 and reply["machine_id"] == machine_id
        evil_auth = {"Authorization": f"Bearer {reply['agent_token']}"}
        r = await evil.get("/v1/agent/jobs/next", params={"wait": "0"}, headers=evil_auth)
        assert r.status == 204  # no job, so no user-data
        r = await evil.post(
            f"/v1/agent/jobs/{job['id']}/finish",
            json={"attempt": 1, "result": {"outcome": "succeeded"}},
            headers=evil_auth,
        )
        assert r.status == 409 and "quarantined" in (await r.json())["error"]
        r = await evil.post("/v1/agent/inventory", json=impostor.to_wire(), headers=evil_auth)
        assert r.status == 409
        r = await evil.post("/v1/agent/heartbeat", json={"job_id": job["id"]}, headers=evil_auth)
        assert await r.json() == {"cancel": [job["id"]]}

    shown = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert shown["state"] == "quarantined" and shown["inventory"]["system"]["uuid"] == victim().system.uuid
    q = shown["quarantine"]
    assert q["address"] == ATTACKER and q["previous_state"] == "failed"  # the cancelled deploy
    assert q["changes"] == [
        "system uuid 4c4c4544-0000-1000-8000-000000000001 -> 99999999-0000-0000-0000-000000000000",
        "disk serial=S1 removed",
        "disk serial=S2 removed",
        "disk serial=QM1 added",
    ]
    (warning,) = shown["events"]
    assert warning["job_id"] is None and warning["kind"] == "warning"
    assert (
        "bound: uuid 4c4c4544-0000-1000-8000-000000000001; disks serial=S1, serial=S2" in warning["message"]
    )
    assert "seen: uuid 99999999-0000-0000-0000-000000000000; disks serial=QM1" in warning["message"]
    assert (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).status == 200

    # the secret is nowhere an operator's tools, logs or metrics show
    for path in ("/v1/jobs", f"/v1/jobs/{job['id']}", "/v1/events", f"/v1/machines/{machine_id}", "/metrics"):
        text = await (await h.client.get(path, headers=h.op)).text()
        assert "hunter2" not in text, path
    assert "hunter2" not in caplog.text
    listed = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
    assert listed["params"]["cloud_init"]["user_data"] == f"<{len(secret)} bytes, not shown>"


async def test_a_replaced_disk_shows_what_changed_and_accept_restores_the_jobs(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    token = await token_from(h.client, MAC1)
    assert token
    machine_id = (await register(h.client, token, victim()))[1]["machine_id"]
    job = await h.create_job(machine_id, "inventory")
    replaced = with_disks(inventory(macs=(MAC1,)), disk("sda", "S1"), disk("sdb", "S3"))
    token = await token_from(h.client, MAC1)
    assert token
    status, reply = await register(h.client, token, replaced)
    assert status == 200
    auth = {"Authorization": f"Bearer {reply['agent_token']}"}
    assert (await h.client.get("/v1/agent/jobs/next", params={"wait": "0"}, headers=auth)).status == 204
    shown = await (await h.client.get(f"/v1/machines/{MAC1}", headers=h.op)).json()
    assert shown["quarantine"]["changes"] == ["disk serial=S2 removed", "disk serial=S3 added"]

    r = await h.client.post(f"/v1/machines/{MAC1}/accept", headers=h.op)
    assert r.status == 200
    accepted = await r.json()
    assert accepted["state"] == "ready" and accepted["quarantine"] is None
    assert [d["serial"] for d in accepted["fingerprint"]["disks"]] == ["S1", "S3"]
    assert [d["serial"] for d in accepted["inventory"]["disks"]] == ["S1", "S3"]
    r = await h.client.get("/v1/agent/jobs/next", params={"wait": "0"}, headers=auth)
    assert r.status == 200 and (await r.json())["job_id"] == job["id"]
    r = await h.client.post(f"/v1/machines/{MAC1}/accept", headers=h.op)
    assert (
        r.status == 409 and "expected a quarantined machine to accept, but it is" in (await r.json())["error"]
    )
    events = [
        e["message"]
        for e in (await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json())["events"]
    ]
    assert events[-1].startswith("accepted by operator: disk serial=S2 removed; disk serial=S3 added")

    token = await token_from(h.client, MAC1)  # the new hardware is now the bound one
    assert token and (await register(h.client, token, replaced))[0] == 200
    assert (await (await h.client.get(f"/v1/machines/{MAC1}", headers=h.op)).json())["state"] == "ready"


async def test_an_inventory_claiming_another_machines_mac_is_refused(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    await h.enroll(MAC1)
    async with attacker(h) as evil:
        token = await token_from(evil, MAC2)
        assert token
        status, body = await register(evil, token, inventory(uuid="abcd", macs=(MAC2, MAC1)))
    assert status == 401 and f"inventory lists MAC {MAC1}, which belongs to machine" in body["error"]
    shown = await (await h.client.get(f"/v1/machines/{MAC1}", headers=h.op)).json()
    assert shown["macs"] == [MAC1] and shown["state"] == "ready"
    assert (await refusals(h))["mac_conflict"] == 1


async def test_closed_discovery_gives_no_token_to_an_unknown_mac(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path, discovery=Discovery.CLOSED)
    r = await h.client.get("/boot/ipxe", params={"mac": MAC2})
    script = await r.text()
    assert "sledge.token" not in script and script.endswith("\nexit 1\n")
    assert f"MAC {MAC2} is not expected (discovery closed)" in script
    assert (await (await h.client.get("/v1/machines", headers=h.op)).json())["machines"] == []  # no record
    assert (await refusals(h))["discovery_closed"] == 1

    r = await h.client.post(f"/v1/machines/{MAC2}/expect", headers=h.op)
    assert r.status == 201 and (await r.json())["expected"] is True
    token = await token_from(h.client, MAC2)
    assert token
    status, reply = await register(h.client, token, inventory(uuid="u2", macs=(MAC2,)))
    assert status == 200
    assert await token_from(h.client, MAC2) is None  # expected once: it enrolled, nothing queued
    await h.create_job(reply["machine_id"], "inventory")
    assert await token_from(h.client, MAC2)  # a queued job lets it boot the agent again
    r = await h.client.post("/v1/machines/nonsense/expect", headers=h.op)
    assert r.status == 400


async def test_failed_enrollments_are_rate_limited_per_address_and_per_mac(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path, failures_per_mac=3, failures_per_address=5, failure_window=60.0)
    forged = "sle_0000000000000000_" + "A" * 43
    async with attacker(h) as evil:
        for i in range(5):  # guessing tokens for five MACs: the address reaches its limit
            mac = f"52:54:00:00:01:{i:02x}"
            assert (await register(evil, forged, inventory(uuid=f"u{i}", macs=(mac,))))[0] == 401
        status, body = await register(evil, forged, inventory(uuid="u9", macs=("52:54:00:00:01:09",)))
        assert status == 429 and f"address {ATTACKER} had 5 failed enrollments recently" in body["error"]
        r = await evil.post(
            "/v1/agent/register",
            json={"enrollment_token": forged, "inventory": inventory(macs=(MAC2,)).to_wire()},
        )
        assert r.status == 429 and int(r.headers["Retry-After"]) == 60
        # even a good token is refused from the blocked address
        good = await token_from(evil, MAC2)
        assert good and (await register(evil, good, inventory(uuid="u2", macs=(MAC2,))))[0] == 429

    for _ in range(3):  # the victim's MAC, from the victim's address
        assert (await register(h.client, forged, victim()))[0] == 401
    status, body = await register(h.client, forged, victim())
    assert status == 429 and f"mac {MAC1} had 3 failed enrollments" in body["error"]
    assert await h.enroll(MAC2, uuid="u2")  # another MAC from the same (unblocked) address enrolls

    counted = await refusals(h)
    assert counted["token"] == 8 and counted["rate_limited"] == 4
    h.clock.now += 61  # the window passes
    token = await token_from(h.client, MAC1)
    assert token and (await register(h.client, token, victim()))[0] == 200


async def test_with_sledges_dhcp_only_the_leased_address_boots_and_enrolls(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    config = Config(data_dir=tmp_path / "data")
    key = ensure_operator_token(config.data_dir)
    store = SqliteStore(tmp_path / "state.db")
    app = make_app(
        config,
        store,
        operator_key=key,
        clock=Clock(),
        leases=StaticLeases({MAC1: "127.0.0.1", MAC2: ATTACKER}),
    )
    client = await aiohttp_client(app)
    h = Harness(
        client,
        config,
        SqliteStore(tmp_path / "state.db"),
        Clock(),
        operator_token_path(config.data_dir).read_text().strip(),
    )
    async with attacker(h) as evil:
        r = await evil.get("/boot/ipxe", params={"mac": MAC1})
        script = await r.text()
        assert (
            "sledge.token" not in script
            and f"from address {ATTACKER}, expected 127.0.0.1 (its DHCP lease" in script
        )
        assert await token_from(evil, MAC2)  # its own lease
    r = await client.get("/boot/ipxe", params={"mac": "52:54:00:00:00:03"})
    assert "expected an address sledge's DHCP leased to it (none)" in await r.text()
    assert (await refusals(h))["lease"] == 2
    token = await token_from(client, MAC1)
    assert token and (await register(client, token, victim()))[0] == 200


async def test_one_request_spends_the_failures_of_one_mac_only(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path, failures_per_mac=1, failures_per_address=100)
    forged = "sle_0000000000000000_" + "A" * 43
    listed = ("52:54:00:00:09:09", MAC1, MAC2)
    async with attacker(h) as evil:
        assert (await register(evil, forged, inventory(uuid="u9", macs=listed)))[0] == 401
        assert (await register(evil, forged, inventory(uuid="u9", macs=listed)))[0] == 429
    token = await token_from(h.client, MAC1)
    assert token and (await register(h.client, token, victim()))[0] == 200


async def test_behind_a_trusted_proxy_failed_enrollments_count_against_the_client_it_names(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    """Through a proxy every request comes from the proxy's address: one guessing machine locked
    every other one out. A trusted proxy's X-Forwarded-For names the client instead (its boot
    script's token is bound to that address too); an untrusted sender's header is not read."""
    h = await start(aiohttp_client, tmp_path, failures_per_address=3, trusted_proxies=("127.0.0.1",))
    forged = "sle_0000000000000000_" + "A" * 43

    async def enroll(client: Any, via: str, mac: str, token: str = "") -> tuple[int, dict[str, Any]]:
        """Boot (unless a token is given) and register from `via`, as the proxy says."""
        headers = {"X-Forwarded-For": via}
        if not token:
            script = await (await client.get("/boot/ipxe", params={"mac": mac}, headers=headers)).text()
            token = re.search(r"sledge\.token=(\S+)", script).group(1)  # type: ignore[union-attr]
        body = {"enrollment_token": token, "inventory": inventory(uuid=mac, macs=(mac,)).to_wire()}
        r = await client.post("/v1/agent/register", json=body, headers=headers)
        return r.status, await r.json()

    for i in range(3):
        assert (await enroll(h.client, "10.0.0.66", f"52:54:00:00:02:0{i}", forged))[0] == 401
    status, body = await enroll(h.client, "10.0.0.66", "52:54:00:00:02:08", forged)
    assert status == 429 and "address 10.0.0.66 had 3 failed enrollments" in body["error"], body
    assert (await enroll(h.client, "10.0.0.7", MAC2))[0] == 200, "another machine behind the proxy"

    async with attacker(h) as evil:  # not a trusted proxy: its header is its own word, unread
        for i in range(3):
            assert (await enroll(evil, "10.0.0.8", f"52:54:00:00:04:0{i}", forged))[0] == 401
        status, body = await enroll(evil, "10.0.0.8", "52:54:00:00:04:09", forged)
        assert status == 429 and f"address {ATTACKER} had 3" in body["error"], body
    assert (await enroll(h.client, "10.0.0.8", "52:54:00:00:03:01"))[0] == 200, "10.0.0.8 is not blocked"
