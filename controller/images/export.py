"""`sledge image export`: write an image back out of the store, verified.

To a file: a sparse temporary file beside the destination, renamed into place
only when every chunk has verified, so a damaged store leaves the destination
untouched. To a block device: every chunk is verified first, then written
(with the writer's refusals, then O_EXCL), zero chunks with BLKZEROOUT.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.image.manifest import ChunkKind, Manifest
from agent.image.store import LocalStore
from agent.writer.device import open_target, pwrite_all
from controller.images.errors import ImageToolError


class ExportError(ImageToolError):
    pass


def export_image(
    store: LocalStore,
    manifest: Manifest,
    dest: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        _to_device(store, manifest, dest, progress)
    elif st is None or stat.S_ISREG(st.st_mode):
        _to_file(store, manifest, Path(dest), progress)
    else:
        raise ExportError(
            errno.EINVAL, f"export destination {dest}: expected a regular file or a block device"
        )


def _to_file(
    store: LocalStore, manifest: Manifest, dest: Path, progress: Callable[[int], None] | None
) -> None:
    tmp = dest.with_name(f".{dest.name}.sledge-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, manifest.image_size)  # zero chunks stay holes
        for chunk in manifest:
            if chunk.kind is ChunkKind.DATA:
                pwrite_all(fd, store.read_chunk(chunk), chunk.offset)
            if progress:
                progress(chunk.length)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, dest)


def _to_device(
    store: LocalStore, manifest: Manifest, dest: str, progress: Callable[[int], None] | None
) -> None:
    for chunk in manifest.data_chunks():
        store.read_chunk(chunk)  # raises ChunkInvalid before anything is written
    # the writer's own refusals: mounted, held, read-only or too small; then O_EXCL
    target = open_target(dest, manifest.image_size)
    try:
        for chunk in manifest:
            if chunk.kind is ChunkKind.ZERO:
                target.zero(chunk.offset, chunk.length)
            else:
                target.write(store.read_chunk(chunk), chunk.offset)
            if progress:
                progress(chunk.length)
        os.fsync(target.buffered_fd)
    finally:
        target.close()
