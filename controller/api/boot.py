"""Network boot: a per-machine iPXE script, and the agent's kernel and initramfs.

A machine that is deployed and has nothing queued boots its disk (`exit 1` hands
back to the firmware's next boot entry: a UEFI boot manager whose entry returns
EFI_SUCCESS stops at its menu instead, so the status must be an error, docs/boot.md);
so does one that may not enroll (discovery closed and nothing expected of it, or not
from its DHCP lease). Any other machine chains the agent with a fresh one-time
enrollment token bound to its MAC and to the address that asked
(controller.fleet.enrollment, docs/trust.md).
"""

from __future__ import annotations

from aiohttp import web

from agent.protocol import BOOT_SCRIPT_PATH, ProtocolError, normalize_mac
from controller.api.context import SERVED, Route, peer, services
from controller.fleet.errors import NotFound


async def ipxe(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    mac = request.query.get("mac")
    if mac is None:
        raise ProtocolError("mac", "the booting NIC's MAC (chain /boot/ipxe?mac=${net0/mac})", "nothing")
    mac = normalize_mac(mac)
    decision = svc.enrollment.boot(mac, peer(request))
    if decision.refusal is not None:
        svc.metrics.refused(decision.refusal)
    if decision.enrollment_token is None:
        script = f"#!ipxe\necho sledge: {decision.note}\nexit 1\n"
    else:
        cfg = svc.config
        # the machine's own arguments last: its `sledge.shell=1` beats a default `sledge.shell=0`
        args = " ".join(
            a
            for a in (
                f"sledge.controller={cfg.url} sledge.token={decision.enrollment_token} sledge.mac={mac}",
                cfg.kernel_args,
                decision.kernel_args,
            )
            if a
        )
        script = (
            "#!ipxe\n"
            f"echo sledge: {decision.note}\n"
            f"kernel {cfg.url}/boot/files/{cfg.kernel} initrd={cfg.initrd} {args}\n"
            f"initrd {cfg.url}/boot/files/{cfg.initrd}\n"
            "boot\n"
        )
    return web.Response(text=script, content_type="text/plain", headers={"Cache-Control": "no-store"})


async def entry(request: web.Request) -> web.StreamResponse:
    """The script a DHCP server names as the boot file: it asks for this machine's own script."""
    url = services(request).config.url
    script = f"#!ipxe\nchain {url}{BOOT_SCRIPT_PATH}?mac=${{net0/mac}}\n"
    return web.Response(text=script, content_type="text/plain", headers={"Cache-Control": "no-store"})


async def boot_file(request: web.Request) -> web.StreamResponse:
    cfg = services(request).config
    name = request.match_info["name"]
    if name not in (cfg.kernel, cfg.initrd):
        raise NotFound(f"boot file {name!r}: expected {cfg.kernel!r} or {cfg.initrd!r}")
    path = cfg.boot_dir / name
    if not path.is_file():
        raise NotFound(f"boot file {path}: missing (put the agent's kernel and initramfs in {cfg.boot_dir})")
    request[SERVED] = True
    return web.FileResponse(path)


ROUTES = (
    Route(
        "GET",
        "/boot.ipxe",
        entry,
        "The DHCP boot file: chains /boot/ipxe with the booting NIC's MAC",
        auth="none",
        response="IpxeScript",
    ),
    Route(
        "GET",
        BOOT_SCRIPT_PATH,
        ipxe,
        "iPXE script for the machine with this MAC",
        auth="none",
        response="IpxeScript",
        params=("mac",),
    ),
    Route(
        "GET",
        "/boot/files/{name}",
        boot_file,
        "The agent's kernel or initramfs",
        auth="none",
        response="Binary",
    ),
)
