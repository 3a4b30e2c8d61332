"""Where things live in a chunk store; pure, and the one place that knows the paths.

    chunks/<first two hex>/<digest hex>   stored bytes of a chunk (raw or zstd)
    manifests/<digest hex>                canonical manifest bytes
    catalog/<name>/<version>              the manifest digest, hex, one line

Every name that reaches a path is checked here, so nothing from the network can
walk out of the store.
"""

from __future__ import annotations

import re

from agent.image.errors import ImageError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class LayoutError(ImageError, ValueError):
    """A name, version or digest that cannot be a store path."""


def check_digest(value: str) -> str:
    if not _HEX64.fullmatch(value):
        raise LayoutError(f"digest {value[:80]!r}: expected 64 lowercase hex characters")
    return value


def check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise LayoutError(
            f"image {kind} {value[:80]!r}: expected 1-128 of A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit"
        )
    return value


def chunk_path(digest_hex: str) -> str:
    check_digest(digest_hex)
    return f"chunks/{digest_hex[:2]}/{digest_hex}"


def manifest_path(digest_hex: str) -> str:
    return f"manifests/{check_digest(digest_hex)}"


def catalog_path(name: str, version: str) -> str:
    return f"catalog/{check_name('name', name)}/{check_name('version', version)}"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """NAME or NAME:VERSION -> (name, version or None)."""
    name, sep, version = ref.partition(":")
    check_name("name", name)
    if sep:
        return name, check_name("version", version)
    return name, None
