"""`sledge image export`: write an image back out of the store, through the agent's writer.

One writer: chunks come from a DirectorySource on the store (the one guarded reader of
store files), are verified as they are fetched, once, and are written by the same
pipeline `sledge-agent write` and deploy use.

To a file: a sparse temporary file beside the destination (zero chunks stay holes),
renamed into place only when every chunk has verified, so a damaged store leaves the
destination untouched. To a block device: the writer's refusals (mounted, held,
read-only, too small), then O_EXCL; zero chunks by BLKZEROOUT. Before anything is
written every chunk file is checked present, a regular file and of its stored size
(a stat, no read); a chunk whose bytes are damaged in place stops the export at that
chunk, the device then holding part of the image (as a deploy would leave it).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.image.manifest import Manifest
from agent.image.store import LocalStore, NotInStore, StoreFileError, open_store_file
from agent.writer.device import OpenTarget, open_target
from agent.writer.events import Event, Progress
from agent.writer.fetch import RetryPolicy
from agent.writer.pipeline import WriteOptions, Writer
from agent.writer.sources import DirectorySource
from controller.images.errors import ImageToolError

# A local store has no outage to wait out: one round, and a bad chunk fails the export at once.
OPTIONS = WriteOptions(inplace=False, fix_gpt=False, retry=RetryPolicy(retries=1))


class ExportError(ImageToolError):
    pass


def export_image(
    store: LocalStore,
    manifest: Manifest,
    digest: str,
    dest: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """`progress` gets the bytes of the image done so far."""
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        _to_device(store, manifest, digest, dest, progress)
    elif st is None or stat.S_ISREG(st.st_mode):
        _to_file(store, manifest, digest, Path(dest), progress)
    else:
        raise ExportError(
            errno.EINVAL, f"export destination {dest}: expected a regular file or a block device"
        )


def _write(
    store: LocalStore,
    manifest: Manifest,
    digest: str,
    target: OpenTarget,
    progress: Callable[[int], None] | None,
) -> None:
    def listen(event: Event) -> None:
        if progress is not None and isinstance(event, Progress):
            progress(event.done_bytes)

    source = DirectorySource(str(store.root))
    Writer(manifest, digest, [source], target, OPTIONS, listen, threading.Event()).run()


def _to_file(
    store: LocalStore, manifest: Manifest, digest: str, dest: Path, progress: Callable[[int], None] | None
) -> None:
    tmp = dest.with_name(f".{dest.name}.sledge-{uuid.uuid4().hex[:8]}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))  # ours alone
    try:
        target = open_target(str(tmp), manifest.image_size, exact_file=True)  # empty: fresh, sparse
        try:
            _write(store, manifest, digest, target, progress)
        finally:
            target.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.rename(tmp, dest)


def _check_present(store: LocalStore, manifest: Manifest) -> None:
    """Every data chunk's file there, regular and of its stored size: what can be known
    without reading the bytes (the writer verifies those as it fetches them)."""
    for chunk in manifest.data_chunks():
        try:
            fd, size = open_store_file(store.chunk_file(chunk))
        except NotInStore:
            raise NotInStore(
                f"{chunk.describe()}: not in store {store.root} (no {store.chunk_file(chunk)})"
            ) from None
        os.close(fd)
        if size != chunk.stored_len:
            raise StoreFileError(
                store.chunk_file(chunk),
                f"{chunk.describe()}: expected {chunk.stored_len} bytes, file has {size}",
            )


def _to_device(
    store: LocalStore, manifest: Manifest, digest: str, dest: str, progress: Callable[[int], None] | None
) -> None:
    _check_present(store, manifest)
    target = open_target(dest, manifest.image_size)  # the writer's refusals, then O_EXCL
    try:
        _write(store, manifest, digest, target, progress)
    finally:
        target.close()
