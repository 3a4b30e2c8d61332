"""Chunk stores for tests: a raw image file imported with the real importer."""

from __future__ import annotations

from pathlib import Path

from agent.image.manifest import Manifest
from controller.images.importer import ImportOptions, import_image
from controller.images.sources import RawSource
from controller.images.store import WritableStore
from tests.images import MiB


def import_store(
    root: Path, src: Path, name: str = "img", version: str = "1", chunk_size: int = MiB
) -> tuple[Path, Manifest, str]:
    """Import `src` into a store at `root`: (store root, manifest, manifest digest)."""
    store = WritableStore(root)
    source = RawSource(str(src))
    try:
        result = import_image(store, source, ImportOptions(name, version, chunk_size=chunk_size))
    finally:
        source.close()
    return store.root, result.manifest, result.digest
