"""`sledge mirror-config`: print the nginx configuration of a rack mirror (controller/images/mirror.py)."""

from __future__ import annotations

import argparse
from typing import Any

from controller.cli.images import parse_size
from controller.config import Config
from controller.images.mirror import MirrorError, MirrorPlan, check_dir, parse_listen, render, upstream_from


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "mirror-config",
        help="print an nginx caching-proxy configuration for a rack mirror of the chunk store",
        description="A caching proxy for chunks/ and manifests/ (immutable), nothing else. "
        "Agents reach it at http://HOST:PORT/store/ (list it with `sledge serve --mirror`).",
    )
    upstream = p.add_mutually_exclusive_group()
    upstream.add_argument(
        "--controller", help="the controller's URL as the mirror reaches it (default: SLEDGE_URL)"
    )
    upstream.add_argument(
        "--store", help="instead, a store tree's URL: an nginx on the store, a bucket or CDN prefix"
    )
    p.add_argument(
        "--listen", default="8080", help="PORT or ADDRESS:PORT to serve agents on (default %(default)s)"
    )
    p.add_argument("--max-size", type=parse_size, required=True, help="the cache's bound on disk, e.g. 200G")
    p.add_argument(
        "--cache-dir",
        default="/var/cache/nginx/sledge",
        help="where nginx keeps the cache (default %(default)s)",
    )
    p.add_argument("--inactive-days", type=int, default=30, help="evict chunks unused this long (default 30)")
    p.add_argument("--upstream-ca", help="verify an https upstream against this CA file")


def plan_from(args: argparse.Namespace, config: Config) -> MirrorPlan:
    if args.store:
        upstream = upstream_from(args.store, controller=False, option="--store")
    else:
        url = args.controller or config.controller_url
        upstream = upstream_from(url, controller=True, option="--controller")
    if args.inactive_days < 1:
        raise MirrorError("--inactive-days", "a whole number of days >= 1", str(args.inactive_days))
    return MirrorPlan(
        upstream=upstream,
        listen=parse_listen(args.listen),
        cache_dir=check_dir(args.cache_dir, "--cache-dir"),
        max_size=args.max_size,
        inactive_days=args.inactive_days,
        upstream_ca=check_dir(args.upstream_ca, "--upstream-ca") if args.upstream_ca else None,
    )


def run(args: argparse.Namespace, config: Config) -> int:
    print(render(plan_from(args, config)), end="")
    return 0
