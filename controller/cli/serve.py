"""`sledge serve`: open the state database and run the controller until stopped."""

from __future__ import annotations

import argparse
import logging
import resource
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.api.forwarded import parse_proxies
from controller.app import make_app
from controller.auth import ensure_operator_token, operator_token_path
from controller.boot import cmdline
from controller.boot.leases import DnsmasqLeases
from controller.boot.prepare import BootNetwork, default_url, prepare
from controller.boot.settings import DhcpOptions, parse_efi, parse_lease_time, parse_mode, parse_range
from controller.boot.supervisor import Supervisor, cleanup_ctx, end_stale
from controller.config import DEFAULT_PORT, Config
from controller.state.sqlite import SqliteStore
from controller.trust import Discovery


def listen_arg(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"listen address {text!r}: expected HOST:PORT, e.g. 0.0.0.0:{DEFAULT_PORT}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the controller")
    p.add_argument("--listen", type=listen_arg, default=("127.0.0.1", DEFAULT_PORT), help="HOST:PORT")
    p.add_argument("--data", type=Path, default=None, help="data directory (default: $SLEDGE_DATA, ...)")
    p.add_argument(
        "--url", default="", help="the URL agents use to reach this controller (default: from --listen)"
    )
    p.add_argument("--mirror", action="append", default=[], help="another chunk store base URL for agents")
    p.add_argument(
        "--s3-store",
        default="",
        metavar="s3://BUCKET[/PREFIX]",
        help="answer chunk and manifest requests the local store cannot with a redirect to a "
        "presigned URL of this bucket (boto3's credentials stay here; agents get none)",
    )
    p.add_argument("--s3-endpoint-url", default="", help="the S3 API's URL for anything but AWS")
    p.add_argument(
        "--presign-seconds",
        type=int,
        default=Config.presign_seconds,
        help="lifetime of a presigned URL (default: %(default)s)",
    )
    p.add_argument(
        "--kernel-args",
        type=kernel_args,
        default=Config.kernel_args,
        help="more agent kernel arguments, e.g. sledge.ca=... to pin the CA (default: %(default)s)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDRESS[/PREFIX]",
        help="a reverse proxy in front of the controller whose X-Forwarded-For names the client"
        " (agents' peer addresses, enrollment limits); repeat for more. Name only the proxies",
    )
    p.add_argument("--tls-cert", type=Path, default=None)
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--lease", type=float, default=60.0, help="seconds a job survives without a heartbeat")
    p.add_argument(
        "--discovery",
        choices=[d.value for d in Discovery],
        default=Config.discovery.value,
        help="open: any booting MAC may enroll; closed: only MACs with a job or `sledge machine expect`"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--enrollment-ttl",
        type=float,
        default=Config.enrollment_ttl,
        help="seconds an enrollment token lives (default: %(default)s)",
    )
    p.add_argument("--reap-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--announce-interval",
        type=float,
        default=Config.announce_seconds,
        help="seconds between a deploying agent's tracker announces (default: %(default)s)",
    )
    p.add_argument(
        "--bmc-timeout",
        type=float,
        default=Config.bmc_timeout,
        help="seconds per BMC request (default: %(default)s)",
    )
    p.add_argument(
        "--power-poll",
        type=float,
        default=Config.power_poll_seconds,
        help="seconds between power polls of one machine's BMC, jittered (default: %(default)s)",
    )
    p.add_argument(
        "--boot-deadline",
        type=float,
        default=Config.boot_deadline,
        help="seconds a job waits for the agent after a power cycle (default: %(default)s)",
    )
    add_dhcp_arguments(p)


def add_dhcp_arguments(p: argparse.ArgumentParser) -> None:
    """The network-boot flags, shared with `sledge dhcp-config`."""
    g = p.add_argument_group("network boot (dnsmasq: DHCP/proxyDHCP and TFTP)")
    g.add_argument(
        "--dhcp",
        default="off",
        help="proxy: PXE answers beside the site's DHCP server; full: also lease addresses; off (default)",
    )
    g.add_argument("--interface", default="", help="the provisioning network's interface, e.g. br0")
    g.add_argument("--dhcp-range", default="", help="FIRST,LAST addresses to lease (--dhcp full)")
    g.add_argument("--lease-time", default="3600", help="lease seconds, or 90m, 12h (default %(default)s)")
    g.add_argument("--ipxe-efi", default="snponly", help="UEFI iPXE binary: snponly (default) or ipxe")


def dhcp_from_args(args: argparse.Namespace) -> DhcpOptions:
    return DhcpOptions(
        mode=parse_mode(args.dhcp),
        interface=args.interface,
        range=parse_range(args.dhcp_range) if args.dhcp_range else None,
        lease_time=parse_lease_time(args.lease_time),
        ipxe_efi=parse_efi(args.ipxe_efi),
    )


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    host, port = args.listen
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS: expected both --tls-cert and --tls-key, or neither")
    if not args.enrollment_ttl > 0:
        raise ValueError(f"--enrollment-ttl: expected seconds > 0, got {args.enrollment_ttl}")
    for flag, value in (
        ("--bmc-timeout", args.bmc_timeout),
        ("--power-poll", args.power_poll),
        ("--boot-deadline", args.boot_deadline),
        ("--announce-interval", args.announce_interval),
    ):
        if not value > 0:
            raise ValueError(f"{flag}: expected seconds > 0, got {value}")
    parse_proxies(args.trusted_proxy)  # refused here, by name, rather than when the app starts
    return replace(
        base,
        data_dir=args.data or base.data_dir,
        trusted_proxies=tuple(args.trusted_proxy),
        host=host,
        port=port,
        public_url=args.url,
        mirrors=tuple(args.mirror),
        s3_store=args.s3_store,
        s3_endpoint_url=args.s3_endpoint_url,
        presign_seconds=args.presign_seconds,
        lease_seconds=args.lease,
        discovery=Discovery(args.discovery),
        enrollment_ttl=args.enrollment_ttl,
        reap_interval=args.reap_interval,
        announce_seconds=args.announce_interval,
        kernel_args=args.kernel_args,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        dhcp=dhcp_from_args(args),
        bmc_timeout=args.bmc_timeout,
        power_poll_seconds=args.power_poll,
        boot_deadline=args.boot_deadline,
    )


def kernel_args(value: str) -> str:
    """--kernel-args: the same rule as a machine's own (controller/boot/cmdline.py): the words
    go into every boot script, so nothing iPXE would expand and no second script line."""
    problem = cmdline.problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    Every agent keeps a long-poll connection open, and each is a file descriptor: the usual soft
    limit of 1024 (systemd's default for services too) runs out near 1,000 agents, and then
    requests wait in the listen backlog until they time out.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20  # NOFILE cannot be unlimited
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # a container may refuse; the warning below says what that means
    return soft


def describe(boot: BootNetwork) -> str:
    plan = boot.plan
    leases = f", leasing {plan.range}" if plan.range else ""
    return (
        f"{plan.mode} DHCP on {plan.interface} ({plan.address}{leases}); TFTP {plan.tftp_root};"
        f" iPXE chains {plan.boot_url}; dnsmasq configuration {boot.conf_file}"
    )


def run(args: argparse.Namespace, base: Config) -> int:
    config = config_from_args(args, base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if config.dhcp.mode != "off" and config.host in ("0.0.0.0", "::") and not config.public_url:
        # machines on the provisioning network reach us on its interface's address
        config = replace(config, public_url=default_url(config.dhcp, config.port, bool(config.tls_cert)))
    boot_network = prepare(config.dhcp, config.data_dir, config.url) if config.dhcp.mode != "off" else None
    files = raise_open_file_limit()
    if files != resource.RLIM_INFINITY and files < 4096:
        print(f"sledge: warning: open-file limit {files}: at most ~{files - 64} agents connect", flush=True)
    if config.host in ("0.0.0.0", "::") and not config.public_url:
        print(
            f"sledge: warning: agents will be told {config.url}; pass --url http://ADDRESS:PORT", flush=True
        )
    key = ensure_operator_token(config.data_dir)
    (config.store_dir).mkdir(parents=True, exist_ok=True)
    store = SqliteStore(config.db_path)
    ssl_context = None
    if config.tls_cert and config.tls_key:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    print(
        f"sledge: serving {config.url} (data {config.data_dir},"
        f" operator token {operator_token_path(config.data_dir)})",
        flush=True,
    )
    # With sledge's own DHCP (full mode), an enrollment must also come from the address it leased
    # to the machine's MAC (docs/trust.md); proxy mode leases nothing, so there is nothing to check.
    lease_file = boot_network.lease_file if boot_network is not None else None
    leases = DnsmasqLeases(lease_file) if lease_file is not None else None
    app = make_app(config, store, operator_key=key, leases=leases)
    if boot_network is not None:
        stale = end_stale(boot_network.pid_file, boot_network.conf_file)
        if stale is not None:
            print(f"sledge: ended dnsmasq {stale} left running by a previous controller", flush=True)
        app.cleanup_ctx.append(cleanup_ctx(Supervisor(boot_network.argv)))
        print(f"sledge: {describe(boot_network)}", flush=True)
    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            ssl_context=ssl_context,
            print=None,
            access_log=None,
            shutdown_timeout=5.0,
        )
    finally:
        store.close()
    return 0
