"""The agent API on a real aiohttp server and a real SQLite file."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.protocol import (
    HEARTBEAT_PATH,
    INVENTORY_PATH,
    NEXT_JOB_PATH,
    REGISTER_PATH,
    STORE_PATH,
    Assignment,
    RegisterReply,
    job_events_path,
    job_finish_path,
)
from tests.unit.test_controller_kit import AioClient, Harness, add_image, event, inventory, start

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"


async def test_boot_register_and_get_a_job(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    script = await (await h.client.get("/boot/ipxe", params={"mac": MAC1.upper()})).text()
    assert script.startswith("#!ipxe\n")
    assert (
        f"kernel {h.config.url}/boot/files/vmlinuz initrd=initrd.img sledge.controller={h.config.url} "
        in script
    )
    assert f"initrd {h.config.url}/boot/files/initrd.img\nboot\n" in script
    machine_id = await h.enroll(MAC1)
    body = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert (
        body["state"] == "ready"
        and body["macs"] == [MAC1]
        and body["inventory"]["system"]["hostname"] == "node1"
    )
    listed = await (await h.client.get("/v1/machines", headers=h.op)).json()
    assert [m["id"] for m in listed["machines"]] == [machine_id]  # the boot stub was merged, not duplicated

    job = await h.create_job(machine_id, "inventory")
    assignment = Assignment.from_wire(await h.claim(machine_id))
    assert (assignment.job_id, assignment.kind, assignment.attempt, assignment.next_seq) == (
        job["id"],
        "inventory",
        1,
        1,
    )
    assert assignment.sources == (f"{h.config.url}{STORE_PATH}",)


async def test_enrollment_tokens_are_one_time_expiring_and_bound_to_the_mac(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    token = await h.enrollment_token(MAC1)
    good = {"enrollment_token": token, "inventory": inventory(macs=(MAC1,)).to_wire()}
    foreign = {"enrollment_token": token, "inventory": inventory(macs=(MAC2,)).to_wire()}
    r = await h.client.post(REGISTER_PATH, json=foreign)
    assert r.status == 401 and f"issued to MAC {MAC1}, not to this machine" in (await r.json())["error"]
    r = await h.client.post(REGISTER_PATH, json=good)
    assert r.status == 200
    RegisterReply.from_wire(await r.json())
    r = await h.client.post(REGISTER_PATH, json=good)
    assert r.status == 401 and "already used; boot the machine again" in (await r.json())["error"]

    token = await h.enrollment_token(MAC1)
    h.clock.now += h.config.enrollment_ttl + 30
    r = await h.client.post(REGISTER_PATH, json={**good, "enrollment_token": token})
    assert r.status == 401 and "expired 30s ago" in (await r.json())["error"]

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    r = await h.client.post(REGISTER_PATH, json={**good, "enrollment_token": forged})
    assert r.status == 401 and "unknown" in (await r.json())["error"]


async def test_re_registering_replaces_the_agent_token(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    machine_id = await h.enroll(MAC1)
    old = h.agents[machine_id]
    assert machine_id == await h.enroll(MAC1)  # same machine (same UUID and MAC)
    r = await h.client.post(HEARTBEAT_PATH, json={}, headers={"Authorization": f"Bearer {old}"})
    assert r.status == 401
    r = await h.client.post(HEARTBEAT_PATH, json={}, headers=h.agent(machine_id))
    assert r.status == 200 and await r.json() == {"cancel": []}
    history = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert len(history["inventory_history"]) == 2


async def test_long_poll_is_bounded_and_wakes_on_a_new_job(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path, max_poll_seconds=5.0)
    machine_id = await h.enroll(MAC1)
    t0 = time.monotonic()
    assert await h.claim(machine_id, wait=0.2) is None
    assert 0.2 <= time.monotonic() - t0 < 1.0
    r = await h.client.get(NEXT_JOB_PATH, params={"wait": "99"}, headers=h.agent(machine_id))
    assert r.status == 400 and (await r.json())["field"] == "wait"

    poll = asyncio.create_task(h.claim(machine_id, wait=5))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    job = await h.create_job(machine_id, "erase")
    assignment = await poll
    assert assignment is not None and assignment["job_id"] == job["id"]
    assert time.monotonic() - t0 < 1.0


async def test_events_are_idempotent_and_gaps_refused(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    machine_id = await h.enroll(MAC1)
    job = await h.create_job(machine_id)
    await h.claim(machine_id)
    url = job_events_path(job["id"])

    async def post(*seqs: int, attempt: int = 1) -> tuple[int, dict[str, object]]:
        body = {"attempt": attempt, "events": [event(s, f"e{s}", done=s * 10, total=100) for s in seqs]}
        r = await h.client.post(url, json=body, headers=h.agent(machine_id))
        return r.status, await r.json()

    assert await post(1, 2, 3) == (200, {"next_seq": 4})
    assert await post(2, 3) == (200, {"next_seq": 4})  # a retry: nothing doubled
    assert await post(3, 4) == (200, {"next_seq": 5})
    status, body = await post(7)
    assert status == 409 and "events[0].seq is 7, expected at most 5" in str(body["error"])
    status, body = await post(5, attempt=2)
    assert status == 409 and "attempt 2 is stale, the current attempt is 1" in str(body["error"])

    shown = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
    agent_events = [e for e in shown["events"] if e["source"] == "agent"]
    assert [e["seq"] for e in agent_events] == [1, 2, 3, 4]
    assert (shown["done"], shown["total"]) == (40, 100)

    finish = {"attempt": 1, "result": {"outcome": "succeeded", "message": "ok"}}
    r = await h.client.post(job_finish_path(job["id"]), json=finish, headers=h.agent(machine_id))
    assert r.status == 200 and (await r.json())["state"] == "succeeded"
    r = await h.client.post(job_finish_path(job["id"]), json=finish, headers=h.agent(machine_id))
    assert r.status == 200  # a retried finish
    assert await post(3, 4) == (200, {"next_seq": 5})  # a retried post after the finish
    r = await h.client.post(
        job_finish_path(job["id"]),
        json={**finish, "result": {"outcome": "failed"}},
        headers=h.agent(machine_id),
    )
    assert r.status == 409


async def test_an_agent_cannot_touch_another_machine(aiohttp_client: AioClient, tmp_path: Path) -> None:
    h = await start(aiohttp_client, tmp_path)
    a = await h.enroll(MAC1)
    b = await h.enroll(MAC2, hostname="node2")
    job_b = (
        await h.create_job(b, "deploy", image="", params={}) if False else await h.create_job(b, "inventory")
    )
    assert await h.claim(a) is None  # a never sees b's job
    before = await (await h.client.get(f"/v1/jobs/{job_b['id']}", headers=h.op)).json()
    for path, body in (
        (job_events_path(job_b["id"]), {"attempt": 1, "events": [event(1)]}),
        (job_finish_path(job_b["id"]), {"attempt": 1, "result": {"outcome": "failed"}}),
        (HEARTBEAT_PATH, {"job_id": job_b["id"]}),
    ):
        r = await h.client.post(path, json=body, headers=h.agent(a))
        assert r.status == 404, path
        assert f"job {job_b['id']}: no such job for machine {a}" in (await r.json())["error"]
    # an agent token opens no operator endpoint (b's inventory, jobs, events)
    for path in (f"/v1/machines/{b}", f"/v1/jobs/{job_b['id']}", "/v1/events", "/v1/jobs"):
        assert (await h.client.get(path, headers=h.agent(a))).status == 401, path
    assert await h.claim(b) is not None
    after = await (await h.client.get(f"/v1/jobs/{job_b['id']}", headers=h.op)).json()
    assert before["events"] == after["events"][: len(before["events"])] and after["state"] == "running"


async def test_heartbeat_renews_the_lease_and_reports_cancellation(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path, lease_seconds=60.0)
    machine_id = await h.enroll(MAC1)
    add_image(h.config.store_dir)
    job = await h.create_job(machine_id, "deploy", image="tiny:1")
    await h.claim(machine_id)
    h.clock.now += 50
    r = await h.client.post(HEARTBEAT_PATH, json={"job_id": job["id"]}, headers=h.agent(machine_id))
    assert await r.json() == {"cancel": []}
    shown = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
    assert shown["lease_deadline"] == h.clock.now + 60
    await h.client.post(f"/v1/jobs/{job['id']}/cancel", headers=h.op)
    r = await h.client.post(HEARTBEAT_PATH, json={"job_id": job["id"]}, headers=h.agent(machine_id))
    assert await r.json() == {"cancel": [job["id"]]}
    machine = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert machine["state"] == "failed"  # a deploy cut short leaves the disk unknown


async def test_lease_expiry_requeues_then_fails_with_the_reason(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h: Harness = await start(aiohttp_client, tmp_path, lease_seconds=10.0, reap_interval=0.05)
    machine_id = await h.enroll(MAC1)
    job = await h.create_job(machine_id, "reboot")
    await h.claim(machine_id)
    h.clock.now += 25
    for _ in range(100):
        shown = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
        if shown["state"] != "running":
            break
        await asyncio.sleep(0.02)
    assert shown["state"] == "failed"
    expected = "lease expired 15s ago (no heartbeat from the agent) in attempt 1"
    expected += "; failed (not retried for a reboot)"
    assert shown["reason"] == expected
    assert shown["events"][-1]["message"] == shown["reason"] and shown["events"][-1]["kind"] == "error"

    job = await h.create_job(machine_id, "inventory")
    await h.claim(machine_id)
    h.clock.now += 25
    for _ in range(100):
        shown = await (await h.client.get(f"/v1/jobs/{job['id']}", headers=h.op)).json()
        if shown["state"] != "running":
            break
        await asyncio.sleep(0.02)
    assert shown["state"] == "queued" and shown["reason"].endswith("; re-queued")
    again = await h.claim(machine_id)
    assert again is not None and again["attempt"] == 2


async def test_inventory_updates_go_to_the_agents_own_machine(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    a = await h.enroll(MAC1, uuid="uuid-a")
    b = await h.enroll(MAC2, uuid="uuid-b", hostname="node2")
    fresh = inventory("uuid-a", (MAC1,), "renamed").to_wire()
    r = await h.client.post(INVENTORY_PATH, json=fresh, headers=h.agent(a))
    assert r.status == 200
    shown = await (await h.client.get(f"/v1/machines/{a}", headers=h.op)).json()
    assert shown["hostname"] == "renamed" and len(shown["inventory_history"]) == 2
    r = await h.client.post(INVENTORY_PATH, json=fresh, headers=h.agent(b))  # a's identity, b's token
    assert r.status == 409 and "inventory.system.uuid is uuid-a, expected uuid-b" in (await r.json())["error"]
    other = await (await h.client.get(f"/v1/machines/{b}", headers=h.op)).json()
    assert other["hostname"] == "node2" and len(other["inventory_history"]) == 1


async def deploying(h: Harness, n: int) -> tuple[str, list[str], list[str]]:
    """A one-chunk image and `n` machines each running a deploy job of it: (digest, machines, jobs)."""
    digest = add_image(h.config.store_dir)
    machines, jobs = [], []
    for i in range(n):
        machine_id = await h.enroll(f"52:54:00:00:01:0{i}", hostname=f"n{i}")
        jobs.append((await h.create_job(machine_id, "deploy", image="tiny:1"))["id"])
        assert await h.claim(machine_id) is not None
        machines.append(machine_id)
    return digest, machines, jobs


async def test_a_peer_two_agents_report_for_bad_bytes_is_shunned_and_its_machine_says_so(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    """Through the API: the reports ride on announces, the tracker shuns the peer, and the
    operator reads why in the machine's events."""
    from agent.peer.bitmap import Have
    from agent.protocol import PEERS_PATH, Announce, AnnounceReply

    h = await start(aiohttp_client, tmp_path)
    digest, machines, jobs = await deploying(h, 3)

    async def announce(i: int, *bad: str) -> AnnounceReply:
        message = Announce(jobs[i], digest, 7100 + i, 1, Have(1, 1).encode(), True, bad=bad)
        r = await h.client.post(PEERS_PATH, json=message.to_wire(), headers=h.agent(machines[i]))
        assert r.status == 200, await r.text()
        return AnnounceReply.from_wire(await r.json())

    for i in range(3):
        await announce(i)
    liar = "http://127.0.0.1:7102"
    assert (await announce(0, liar)).shunned == ()
    reply = await announce(1, liar)
    assert reply.shunned == (liar,)
    machine = await (await h.client.get(f"/v1/machines/{machines[2]}", headers=h.op)).json()
    said = [e["message"] for e in machine["events"]]
    shunned = [m for m in said if "removed from the peer swarm" in m]
    assert len(shunned) == 1 and all(word in shunned[0] for word in (machines[0], machines[1], liar)), said
    again = await announce(2)
    assert (again.seed_slot, again.seed_of, again.shunned) == (0, 1, (liar,))
    text = await (await h.client.get("/metrics")).text()
    for line in (
        "sledge_swarms 1",
        "sledge_swarm_agents 2",  # the liar announced again: no place in the swarm
        "sledge_peer_reports_total 2",
        "sledge_peers_shunned_total 1",
    ):
        assert f"\n{line}\n" in text, (line, text[-900:])


@pytest.mark.parametrize(
    ("trusted", "expected"), [(("127.0.0.0/8",), "http://10.1.2.3:7100"), ((), "http://127.0.0.1:7100")]
)
async def test_behind_a_trusted_proxy_peers_are_told_the_agents_addresses_not_the_proxys(
    aiohttp_client: AioClient, tmp_path: Path, trusted: tuple[str, ...], expected: str
) -> None:
    """A deploying agent serves chunks at the address the controller saw it at: behind a proxy
    every agent's peer url was the proxy's (no peer ever served). A trusted proxy's
    X-Forwarded-For names the agent; without --trusted-proxy the header is not read."""
    from agent.peer.bitmap import Have
    from agent.protocol import PEERS_PATH, Announce, AnnounceReply

    h = await start(aiohttp_client, tmp_path, trusted_proxies=trusted)
    digest, machines, jobs = await deploying(h, 2)

    async def announce(i: int, forwarded: str, held: int) -> AnnounceReply:
        message = Announce(jobs[i], digest, 7100 + i, 1, Have(1, held).encode())
        headers = {**h.agent(machines[i]), "X-Forwarded-For": forwarded}
        r = await h.client.post(PEERS_PATH, json=message.to_wire(), headers=headers)
        assert r.status == 200, await r.text()
        return AnnounceReply.from_wire(await r.json())

    await announce(0, "6.6.6.6, 10.1.2.3", 1)  # the agent's own list, then what the proxy saw
    reply = await announce(1, "10.1.2.4", 0)
    assert [p.url for p in reply.peers] == [expected]
