"""`sledge-agent write`: image a disk from a chunk store, like `bmaptool copy`."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import asdict
from typing import Any

from agent.image.errors import ImageError
from agent.progress import ProgressBar, human_bytes
from agent.writer.device import open_for_read, open_target
from agent.writer.errors import VerifyFailed, WriteError
from agent.writer.events import Event, Progress, SourceFailed, SourceHealthChanged, WriteReport
from agent.writer.fetch import RetryPolicy
from agent.writer.load import load_manifest
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.plan import ZeroMode
from agent.writer.sources import ChunkSource, Timeouts, open_source


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text}")
        return value

    return parse


def add_parser(sub: Any) -> None:
    p = sub.add_parser("write", help="write an image from chunk stores to a device or file")
    p.add_argument("--manifest", required=True, help="manifest URL, path, or digest (fetched from --source)")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        help="chunk store base URL or directory; repeat for mirrors (default: the manifest's store)",
    )
    p.add_argument(
        "--digest", help="the manifest's blake3 digest: pins a manifest URL or path not named by it"
    )
    p.add_argument("--device", required=True, help="block device or file to write")
    p.add_argument("--verify", action="store_true", help="read every chunk back past the cache")
    p.add_argument("--no-inplace", action="store_true", help="skip reading the target first (fresh disks)")
    p.add_argument("--zeros-dont-care", action="store_true", help="leave zero chunks' ranges as they are")
    p.add_argument("--no-gpt-fix", action="store_true", help="leave a backup GPT where the image put it")
    p.add_argument(
        "--workers",
        type=_positive(int),
        default=WriteOptions().workers,
        help="threads fetching, decompressing and verifying chunks (default: cores + 2, at least 4)",
    )
    p.add_argument(
        "--write-threads",
        type=_positive(int),
        default=WriteOptions().write_threads,
        help="threads writing verified chunks (default: half the cores, 3 to 8)",
    )
    p.add_argument(
        "--retries", type=_positive(int), default=RetryPolicy().retries, help="rounds over all sources"
    )
    p.add_argument(
        "--stall-timeout",
        type=_positive(float),
        default=Timeouts().stall,
        help="seconds without a byte before a source counts as stalled",
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(run=run)

    v = sub.add_parser("verify", help="check that a device or file holds an image (drift); writes nothing")
    v.add_argument("--manifest", required=True, help="manifest URL, path, or digest (fetched from --source)")
    v.add_argument("--source", action="append", default=[], help="chunk store (only to fetch a manifest)")
    v.add_argument(
        "--digest", help="the manifest's blake3 digest: pins a manifest URL or path not named by it"
    )
    v.add_argument("--device", required=True)
    v.add_argument("--skip-zero", action="store_true", help="do not check ranges the image has as zeros")
    v.add_argument("--workers", type=_positive(int), default=WriteOptions().workers)
    v.set_defaults(run=run_verify)


def run(args: argparse.Namespace) -> int:
    try:
        report = _write(args)
    except ValueError as exc:  # a bad --source, --digest...: nothing was touched
        print(f"sledge-agent: write: {exc}", file=sys.stderr)
        return 2
    except (WriteError, ImageError, OSError) as exc:
        print(f"sledge-agent: write failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(summary(report))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Exit 0 if the target holds the image (chunks that differ only in the partition-table
    sectors sledge rewrites at deploy count as holding it), 1 if it drifted, 2 on error."""
    sources: list[ChunkSource] = []
    try:
        sources = [open_source(s) for s in args.source]
        loaded = load_manifest(args.manifest, sources, expect=args.digest)
        if not sources and loaded.default_source is not None:
            sources = [open_source(loaded.default_source)]
        target = open_for_read(args.device)
        try:
            writer = Writer(
                loaded.manifest, loaded.digest, sources, target, WriteOptions(workers=args.workers)
            )
            drift = writer.drift(skip_zero=args.skip_zero)
        finally:
            target.close()
    except (WriteError, ImageError, ValueError, OSError) as exc:
        print(f"sledge-agent: verify failed: {exc}", file=sys.stderr)
        return 2
    finally:
        for s in sources:
            s.close()
    for chunk in drift.table_only:
        print(
            f"table: chunk {chunk.index} offset {chunk.offset} length {chunk.length} differs only by "
            f"sledge's own table edit ({drift.edit})"
        )
    m = loaded.manifest
    if not drift.clean:
        failure = VerifyFailed(drift.drifted, drift.tables)
        print(f"sledge-agent: {args.device} does not hold the image: {failure}", file=sys.stderr)
        for chunk in drift.drifted:
            print(
                f"differs: chunk {chunk.index} offset {chunk.offset} length {chunk.length} blake3 {chunk.hex}"
            )
        for problem in drift.tables:
            print(f"differs: table {problem}")
        return 1
    print(f"{args.device} holds {m.meta.name}:{m.meta.version} ({loaded.digest}): {len(m)} chunks match")
    return 0


def _write(args: argparse.Namespace) -> WriteReport:
    timeouts = Timeouts(stall=args.stall_timeout)
    sources: list[ChunkSource] = [open_source(s, timeouts) for s in args.source]
    loaded = load_manifest(args.manifest, sources, timeouts, expect=args.digest)
    if not sources:
        if loaded.default_source is None:
            raise ValueError("no --source given and the manifest's location is not a chunk store")
        sources = [open_source(loaded.default_source, timeouts)]
    manifest = loaded.manifest
    options = WriteOptions(
        inplace=not args.no_inplace,
        zero_mode=ZeroMode.DONT_CARE if args.zeros_dont_care else ZeroMode.ZERO,
        verify=args.verify,
        workers=args.workers,
        write_threads=args.write_threads,
        retry=RetryPolicy(retries=args.retries),
        fix_gpt=not args.no_gpt_fix,
    )
    bar = ProgressBar(manifest.image_size, f"write {manifest.meta.name}:{manifest.meta.version}")

    def listener(event: Event) -> None:
        if isinstance(event, Progress):
            bar.update(event.done_bytes, f"net {human_bytes(event.fetched_bytes)}")
        elif isinstance(event, SourceFailed):
            if bar.enabled:
                bar.stream.write("\n")
            print(
                f"sledge-agent: chunk {event.chunk_index} from {event.source}: {event.error}"
                + (" (source dropped)" if event.dropped else ""),
                file=sys.stderr,
            )
        elif isinstance(event, SourceHealthChanged):
            if bar.enabled:
                bar.stream.write("\n")
            print(f"sledge-agent: source {event.source} {event.state}: {event.reason}", file=sys.stderr)

    target = open_target(args.device, manifest.image_size, exact_file=True)
    try:
        writer = Writer(manifest, loaded.digest, sources, target, options, listener, threading.Event())
        report = writer.run()
    finally:
        target.close()
        for s in sources:
            s.close()
        bar.close()
    return report


def summary(r: WriteReport) -> str:
    return (
        f"wrote {human_bytes(r.image_size)} to {r.target} in {r.seconds:.2f} s "
        f"({human_bytes(r.rate)}/s): {r.chunks_fetched} fetched ({human_bytes(r.fetched_bytes)} downloaded), "
        f"{r.chunks_inplace} already in place, {r.chunks_zero} zeroed, {r.chunks_skipped} skipped"
        + (f", {r.chunks_restored} rebuilt from the disk" if r.chunks_restored else "")
        + ("; GPT backup moved to the end" if r.gpt_relocated else "")
        + ("; verified" if r.verified else "")
        + (f"; dropped sources: {', '.join(r.dropped_sources)}" if r.dropped_sources else "")
    )
