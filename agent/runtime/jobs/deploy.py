"""deploy: write the job's image to the chosen disk; verify: compare the disk to an image (drift)."""

from __future__ import annotations

import contextlib
import time

from agent import protocol as p
from agent.disk.errors import DiskError
from agent.hardware.errors import HardwareError
from agent.image.errors import ImageError
from agent.peer.server import ServeLimits
from agent.peer.session import PeerConfig, PeerSession
from agent.peer.source import PeerSource
from agent.progress import human_bytes
from agent.runtime.backoff import Backoff
from agent.runtime.jobs import JobContext, Outcome, choose_disk, failed
from agent.runtime.seed import SeedContent
from agent.writer.errors import BadManifest, ManifestUnavailable, VerifyFailed, WriteError
from agent.writer.events import Event, Progress, SourceFailed, SourceHealthChanged
from agent.writer.fetch import RetryPolicy
from agent.writer.load import LoadedManifest, load_manifest
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.sources import ChunkSource

# An agent outlives short controller outages: about a minute of retries per chunk.
PATIENT = RetryPolicy(retries=10, backoff=0.5, max_backoff=10.0)


def _manifest(ctx: JobContext, sources: list[ChunkSource]) -> LoadedManifest:
    """The job's manifest, pinned by its digest; retried while no source answers."""
    backoff = Backoff(base=0.5, cap=10.0)
    for attempt in range(PATIENT.retries):
        try:
            return load_manifest(ctx.assignment.params.manifest_digest, sources)
        except BadManifest:
            raise  # wrong bytes: retrying will not fix them
        except ManifestUnavailable as exc:
            if attempt == PATIENT.retries - 1:
                raise
            delay = backoff.next_delay()
            ctx.warn(f"{exc}; retrying in {delay:.1f} s")
            if ctx.cancel.wait(delay):
                raise
    raise AssertionError("unreachable")


def _listener(ctx: JobContext, interval: float = 1.0):  # type: ignore[no-untyped-def]
    last = [0.0]

    def listen(event: Event) -> None:
        if isinstance(event, Progress):
            now = time.monotonic()
            if now - last[0] >= interval or event.done_bytes >= event.image_size:
                last[0] = now
                ctx.progress(
                    f"{human_bytes(event.done_bytes)} of {human_bytes(event.image_size)}, "
                    f"{human_bytes(event.rate)}/s, {human_bytes(event.fetched_bytes)} downloaded",
                    event.done_bytes,
                    event.image_size,
                )
        elif isinstance(event, SourceFailed):
            if event.source == PeerSource.name and not event.dropped:
                return  # "not from peers" just means the next source: the session reports dropped peers
            ctx.warn(f"chunk {event.chunk_index} from {event.source}: {event.error}")
        elif isinstance(event, SourceHealthChanged):
            ctx.warn(f"source {event.source} {event.state}: {event.reason}")

    return listen


def _peers(
    ctx: JobContext, loaded: LoadedManifest, fd: int
) -> contextlib.AbstractContextManager[PeerSession | None]:
    """Sharing chunks with the fleet while this deploy runs (sledge.peers=1), else nothing."""
    config = ctx.config
    if not config.peers or ctx.announce is None:
        return contextlib.nullcontext()
    peer_config = PeerConfig(
        host=config.peer_host,
        port=config.peer_port,
        serve=ServeLimits(uploads=config.peer_uploads, rate=config.peer_upload_rate),
        linger=config.peer_linger,
    )
    try:
        return PeerSession(
            loaded.manifest,
            loaded.digest,
            ctx.assignment.job_id,
            ctx.announce,
            fd,
            peer_config,
            ctx.log,
            lambda dropped: ctx.warn(f"peer {dropped.url} dropped: {dropped.reason}"),
        )
    except OSError as exc:  # sharing is an optimisation: the deploy goes on without it
        ctx.warn(f"peers: cannot listen on {config.peer_host}:{config.peer_port}: {exc.strerror or exc}")
        return contextlib.nullcontext()


def deploy(ctx: JobContext) -> Outcome:
    params = ctx.assignment.params
    image = (
        f"{params.image_name}:{params.image_version}" if params.image_name else params.manifest_digest[:16]
    )
    try:
        disk = choose_disk(ctx)
    except HardwareError as exc:
        return failed(f"disk selection: {exc}")
    sources = ctx.sources.open(ctx.source_urls())
    try:
        ctx.stage(f"manifest {params.manifest_digest} from {', '.join(s.name for s in sources)}")
        loaded = _manifest(ctx, sources)
        manifest = loaded.manifest
        ctx.stage(f"writing {image} ({human_bytes(manifest.image_size)}) to {disk.path}")
        target = ctx.disks.open_write(disk.path, manifest.image_size)
        try:
            options = WriteOptions(workers=ctx.config.workers, retry=PATIENT)
            with _peers(ctx, loaded, target.buffered_fd) as peers:
                chosen = peers.sources(sources) if peers else sources
                options = peers.options(options) if peers else options
                writer = Writer(manifest, loaded.digest, chosen, target, options, _listener(ctx), ctx.cancel)
                report = writer.run()
        finally:
            target.close()
    except (WriteError, ImageError, OSError) as exc:
        return failed(f"deploy of {image} to {disk.path}: {exc}", disk.path)
    finally:
        for s in sources:
            s.close()
    seeded = ""
    if params.cloud_init:
        try:
            content = SeedContent.from_cloud_init(params.cloud_init, instance_id=ctx.assignment.job_id)
            seed = ctx.disks.write_seed(disk.path, content)
        except (DiskError, WriteError, OSError) as exc:  # SeedError, or the disk refused
            return failed(
                f"{image} written to {disk.path}, but the cloud-init seed was not: {exc}", disk.path
            )
        ctx.stage(seed.describe())
        seeded = f"; cloud-init seed in partition {seed.partition}"
    restored = (
        f", {report.chunks_restored} rebuilt from the disk (sledge's table edits undone)"
        if report.chunks_restored
        else ""
    )
    try:
        entry = ctx.disks.boot_entry(disk.path, f"{image} (sledge)")
    except (DiskError, OSError) as exc:  # EfiBootError, EfiVarsError
        return failed(f"{image} written to {disk.path}, but its UEFI boot entry was not: {exc}", disk.path)
    if entry:
        ctx.stage(entry)
        seeded += f"; {entry}"
    message = (
        f"{image} on {disk.path}: {report.chunks_fetched} chunks fetched "
        f"({human_bytes(report.fetched_bytes)}), "
        f"{report.chunks_inplace} already in place, {report.chunks_zero} zeroed"
        f"{restored} in {report.seconds:.1f} s"
        f"{seeded}"
    )
    ctx.stage(message)
    result = p.JobResult(p.Outcome.SUCCEEDED, message, disk.path, report.written_bytes, report.fetched_bytes)
    return Outcome(result, then=params.power)


def verify(ctx: JobContext) -> Outcome:
    try:
        disk = choose_disk(ctx)
    except HardwareError as exc:
        return failed(f"disk selection: {exc}")
    sources = ctx.sources.open(ctx.source_urls())
    try:
        loaded = _manifest(ctx, sources)
        ctx.stage(f"comparing {disk.path} with manifest {loaded.digest[:16]}")
        target = ctx.disks.open_read(disk.path)
        try:
            drift = Writer(loaded.manifest, loaded.digest, sources, target, cancel=ctx.cancel).drift()
        finally:
            target.close()
    except (WriteError, ImageError, OSError) as exc:
        return failed(f"verify of {disk.path}: {exc}", disk.path)
    finally:
        for s in sources:
            s.close()
    note = ""
    if drift.table_only:
        chunks = ", ".join(str(c.index) for c in drift.table_only)
        note = f" (chunks {chunks} differ only in the partition table sledge updated at deploy)"
    if not drift.clean:
        failure = VerifyFailed(drift.drifted, drift.tables)
        return failed(f"{disk.path} does not match the image: {failure}{note}", disk.path)
    message = f"{disk.path} matches manifest {loaded.digest}{note}"
    return Outcome(p.JobResult(p.Outcome.SUCCEEDED, message, disk.path))
