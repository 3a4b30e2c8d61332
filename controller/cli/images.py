"""`sledge image ...`: import, list, show, verify, export, rm, prune, publish, pull."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.image.manifest import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from agent.image.store import CatalogEntry
from agent.progress import ProgressBar, human_bytes
from controller.config import Config, store_dir
from controller.images import s3  # boto3 itself is imported only when a bucket is used
from controller.images.chain import ImportPolicy
from controller.images.export import export_image
from controller.images.importer import ImportOptions, import_image
from controller.images.inspect import ALLOWED_FORMATS
from controller.images.sources import open_source
from controller.images.store import WritableStore


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units and t[-1:] != "" and not t[-1:].isdigit() else ""
    number = t[:-1] if unit else t
    try:
        value = int(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected bytes or a number with K/M/G") from None
    return value


def chunk_size_arg(text: str) -> int:
    value = parse_size(text)
    if value & (value - 1) or not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size {text!r}: expected a power of two from 1M to 64M")
    return value


def zstd_level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 19:
        raise argparse.ArgumentTypeError(f"zstd level {text!r}: expected a whole number from 1 to 19")
    return value


def label_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r}: expected KEY=VALUE")
    return key, value


def add_parser(sub: Any) -> None:
    image = sub.add_parser("image", help="manage images in the chunk store")
    isub = image.add_subparsers(dest="image_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", type=Path, help="chunk store directory (default: DATA/store)")

    p = isub.add_parser(
        "import", parents=[common], help="import a raw, block-device or qemu-img-readable image"
    )
    p.add_argument("src")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default=None, help="default: the import time, UTC, YYYYmmddHHMMSS")
    p.add_argument("--chunk-size", type=chunk_size_arg, default=DEFAULT_CHUNK_SIZE)
    p.add_argument(
        "--format",
        default=None,
        choices=ALLOWED_FORMATS,
        help="source format: must match the file; raw is never interpreted (default: detect)",
    )
    p.add_argument(
        "--allow-backing",
        metavar="DIR",
        default=None,
        help="let a qcow2 overlay read its backing chain, only from files under DIR (default: refuse)",
    )
    p.add_argument("--label", type=label_arg, action="append", default=[])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--zstd-level",
        type=zstd_level,
        default=ImportOptions.zstd_level,
        help="zstd level of the stored chunks, 1-19 (default %(default)s; see docs/benchmarks.md)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON before the digest")

    p = isub.add_parser("list", parents=[common], help="list the catalog")
    p.add_argument("--json", action="store_true")
    p = isub.add_parser("show", parents=[common], help="show one image")
    p.add_argument("ref", help="NAME[:VERSION] or manifest digest")
    p.add_argument("--json", action="store_true")
    p.add_argument("--chunks", action="store_true", help="list every chunk")
    isub.add_parser("verify", parents=[common], help="rehash every stored chunk")
    p = isub.add_parser("export", parents=[common], help="write an image to a file (sparse) or block device")
    p.add_argument("ref")
    p.add_argument("dest")
    p = isub.add_parser(
        "rm", parents=[common], help="remove a catalog entry (and its manifest if unreferenced)"
    )
    p.add_argument("ref")
    isub.add_parser("prune", parents=[common], help="remove chunks no manifest references")
    bucket = argparse.ArgumentParser(add_help=False)
    bucket.add_argument(
        "--endpoint-url", default="", help="the S3 API's URL for anything but AWS (MinIO, Ceph RGW...)"
    )
    bucket.add_argument("--workers", type=int, default=8, help="parallel transfers (default 8)")
    bucket.add_argument("--json", action="store_true", help="print the result as JSON")
    p = isub.add_parser(
        "publish",
        parents=[common, bucket],
        help="upload an image to object storage (only the chunks it lacks; the manifest last)",
    )
    p.add_argument("ref", help="NAME[:VERSION] or manifest digest")
    p.add_argument("dest", help="s3://BUCKET[/PREFIX]")
    p = isub.add_parser(
        "pull", parents=[common, bucket], help="download an image from object storage into the store"
    )
    p.add_argument("src", help="s3://BUCKET[/PREFIX]")
    p.add_argument("ref", help="NAME[:VERSION] or manifest digest")
    p.add_argument(
        "--manifest-only",
        action="store_true",
        help="only the manifest and catalog entry (for `sledge serve --s3-store`)",
    )


def run(args: argparse.Namespace, config: Config) -> int:
    root = args.store or store_dir(config.data_dir)
    store = WritableStore(root)
    if args.image_cmd == "import":
        return _import(store, args, config.source_date_epoch)
    handler = {
        "list": _list,
        "show": _show,
        "verify": _verify,
        "export": _export,
        "rm": _rm,
        "prune": _prune,
        "publish": _publish,
        "pull": _pull,
    }[args.image_cmd]
    return handler(store, args)


def _import(store: WritableStore, args: argparse.Namespace, created: int | None) -> int:
    version = args.version or datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    options = ImportOptions(
        name=args.name,
        version=version,
        chunk_size=args.chunk_size,
        labels=dict(args.label),
        workers=args.workers,
        zstd_level=args.zstd_level,
        created=created,
    )
    from agent.image import layout

    layout.catalog_path(options.name, options.version)  # refuse a bad name before reading anything
    policy = ImportPolicy(allow_backing=args.allow_backing)
    source = open_source(args.src, args.format, policy)
    try:
        bar = ProgressBar(source.size, f"import {args.name}:{version}")
        result = import_image(store, source, options, bar.advance)
        bar.close()
    finally:
        source.close()
    s = result.stats
    if args.json:
        extra = {"format": source.format, "backing_files": list(source.backing_files)}
        print(
            json.dumps({"digest": result.digest, "name": args.name, "version": version, **extra, **vars(s)})
        )
    else:
        for path in source.backing_files:
            print(f"read backing file {path} (under --allow-backing {args.allow_backing})")
        print(
            f"imported {args.name}:{version} ({source.format}): {human_bytes(s.image_size)} image, "
            f"{human_bytes(s.data_bytes)} data in {s.data_chunks} chunks, {s.zero_chunks} zero chunks; "
            f"{s.new_chunks} new chunks, {human_bytes(s.new_stored_bytes)} stored; "
            f"{s.seconds:.2f} s ({human_bytes(s.image_size / max(s.seconds, 1e-9))}/s)"
        )
    print(result.digest)
    return 0


def _entry_dict(store: WritableStore, entry: CatalogEntry) -> dict[str, Any]:
    m = store.manifest(entry.digest)
    return {
        "name": entry.name,
        "version": entry.version,
        "digest": entry.digest,
        "image_size": m.image_size,
        "chunk_size": m.chunk_size,
        "chunks": len(m),
        "data_size": m.data_size,
        "stored_size": m.stored_size,
        "created": m.meta.created,
        "source_format": m.meta.source_format,
        "labels": dict(m.meta.labels),
    }


def _list(store: WritableStore, args: argparse.Namespace) -> int:
    rows = [_entry_dict(store, e) for e in store.catalog()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME:VERSION':40} {'SIZE':>10} {'DATA':>10} {'STORED':>10}  DIGEST")
    for r in rows:
        print(
            f"{r['name'] + ':' + r['version']:40} {human_bytes(r['image_size']):>10} "
            f"{human_bytes(r['data_size']):>10} {human_bytes(r['stored_size']):>10}  {r['digest'][:16]}"
        )
    return 0


def _show(store: WritableStore, args: argparse.Namespace) -> int:
    entry = store.resolve(args.ref)
    info = _entry_dict(store, entry)
    m = store.manifest(entry.digest)
    if args.chunks:
        info["chunk_table"] = [
            {
                "index": c.index,
                "offset": c.offset,
                "length": c.length,
                "digest": c.hex,
                "kind": c.kind.name.lower(),
                "encoding": c.encoding.name.lower(),
                "stored_len": c.stored_len,
            }
            for c in m
        ]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "chunk_table":
            continue
        print(f"{key:14} {value}")
    for row in info.get("chunk_table", []):
        print(
            f"  {row['index']:6} {row['offset']:14} {row['kind']:4} {row['encoding']:4} "
            f"{row['stored_len']:9} {row['digest']}"
        )
    return 0


def _verify(store: WritableStore, args: argparse.Namespace) -> int:
    report = store.verify()
    for bad in report.bad:
        print(f"BAD {bad.path}: {bad.reason} (used by {', '.join(m[:16] for m in bad.manifests)})")
    for text in report.bad_manifests:
        print(f"BAD manifest {text}")
    print(
        f"verified {report.chunks} chunks ({human_bytes(report.bytes_checked)}) of {report.manifests} "
        f"manifests: {len(report.bad)} bad chunks, {len(report.bad_manifests)} bad manifests"
    )
    return 0 if report.ok else 1


def _export(store: WritableStore, args: argparse.Namespace) -> int:
    entry = store.resolve(args.ref)
    manifest = store.manifest(entry.digest)
    bar = ProgressBar(manifest.image_size, f"export {args.ref}")
    export_image(store, manifest, entry.digest, args.dest, bar.update)
    bar.close()
    print(f"exported {entry.name}:{entry.version} ({entry.digest}) to {args.dest}")
    return 0


def _rm(store: WritableStore, args: argparse.Namespace) -> int:
    entry = store.resolve(args.ref)
    gone = store.remove(entry)
    print(f"removed {entry.name}:{entry.version}" + (f" and manifest {entry.digest}" if gone else ""))
    return 0


def _prune(store: WritableStore, args: argparse.Namespace) -> int:
    files, freed = store.prune()
    print(f"pruned {files} files, {human_bytes(freed)} freed")
    return 0


def _publish(store: WritableStore, args: argparse.Namespace) -> int:
    dest = s3.S3Location.parse(args.dest)
    entry = store.resolve(args.ref)
    bar = ProgressBar(store.manifest(entry.digest).stored_size, f"publish {args.ref}")
    bucket = s3.client(args.endpoint_url, args.workers)
    result = s3.publish(store, args.ref, dest, bucket, args.workers, _locked(bar.advance))
    bar.close()
    return _transfer_report(result, args.json, f"published to {dest}", "uploaded")


def _pull(store: WritableStore, args: argparse.Namespace) -> int:
    src = s3.S3Location.parse(args.src)
    bar = ProgressBar(0, f"pull {args.ref}")
    bucket = s3.client(args.endpoint_url, args.workers)
    result = s3.pull(src, args.ref, store, bucket, args.workers, args.manifest_only, _locked(bar.advance))
    bar.close()
    return _transfer_report(result, args.json, f"pulled from {src}", "downloaded")


def _locked(advance: Callable[[int], None]) -> Callable[[int], None]:
    """The bar's advance for several transfer threads at once."""
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            advance(n)

    return call


def _transfer_report(result: s3.Transfer, as_json: bool, done: str, verb: str) -> int:
    if as_json:
        print(json.dumps(dataclasses.asdict(result)))
        return 0
    what = f"{result.name}:{result.version}" if result.name else result.digest
    print(
        f"{what} {done}: {result.moved} of {result.chunks} chunks {verb} "
        f"({human_bytes(result.moved_bytes)}), {result.chunks - result.moved} already there; "
        f"{result.seconds:.2f} s"
    )
    print(result.digest)
    return 0


def die(message: str) -> int:
    print(f"sledge: {message}", file=sys.stderr)
    return 1
