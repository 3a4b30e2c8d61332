"""Getting the manifest a write names, and checking it is the one named.

`--manifest` is a digest (fetched from the sources), a URL or a path. A URL or
path whose last component is 64 hex characters is pinned: the bytes must hash to
it before anything is read from them. Anything else is taken as named and its
digest reported.
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from agent.image import layout
from agent.image.manifest import Limits, Manifest, ManifestError, decode, manifest_digest
from agent.writer.errors import BadManifest, FetchError, ManifestUnavailable
from agent.writer.sources import ChunkSource, HttpSource, Timeouts

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LoadedManifest:
    manifest: Manifest
    digest: str
    pinned: bool
    default_source: str | None  # the store the manifest came from, if it looks like one


def load_manifest(
    spec: str,
    sources: Sequence[ChunkSource],
    timeouts: Timeouts | None = None,
    limits: Limits | None = None,
    expect: str | None = None,
) -> LoadedManifest:
    """`expect`: a digest the manifest must have, wherever it comes from (pins any URL or path)."""
    limits = limits or Limits()
    if expect is not None:
        if not _HEX64.fullmatch(expect.lower()):
            raise ValueError(f"expected manifest digest {expect!r}: expected 64 hex characters")
        loaded = load_manifest(spec, sources, timeouts, limits)
        if loaded.digest != expect.lower():
            raise BadManifest(
                f"manifest {spec}: expected blake3 {expect.lower()}, got {loaded.digest}; refusing it"
            )
        return LoadedManifest(loaded.manifest, loaded.digest, True, loaded.default_source)
    if _HEX64.fullmatch(spec.lower()):
        return _from_sources(spec.lower(), sources, limits)
    if spec.startswith(("http://", "https://")):
        parsed = urllib.parse.urlsplit(spec)
        base = f"{parsed.scheme}://{parsed.netloc}"
        path = parsed.path.rstrip("/")
        head, _, _ = path.rpartition("/")
        relative = path.lstrip("/") + (f"?{parsed.query}" if parsed.query else "")
        data = _get(HttpSource(base, timeouts), relative, limits)
        store = base + head.rpartition("/")[0] if head.endswith("/manifests") else None
        last = _last_segment(urllib.parse.unquote(parsed.path))
    else:
        try:
            with open(spec, "rb") as f:
                data = f.read(limits.max_manifest_bytes + 1)
        except OSError as exc:
            raise ManifestUnavailable(f"manifest {spec}: {exc.strerror}") from None
        last = _last_segment(spec)
        parent = os.path.dirname(os.path.abspath(spec))
        store = os.path.dirname(parent) if os.path.basename(parent) == "manifests" else None
    # Pinned by any spelling of a digest (case, percent-encoding, a trailing slash): a URL that
    # names a digest must never be read as unpinned because of how it was written.
    pin = last.lower() if _HEX64.fullmatch(last.lower()) else None
    return _decode(spec, data, pin, limits, store)


def _last_segment(path: str) -> str:
    """The name a path resolves to, as a server or filesystem would read it: dot segments and a
    trailing slash resolved, `;params` and surrounding blanks dropped (a digest so written pins)."""
    name = posixpath.basename(posixpath.normpath(path or "/"))
    return name.split(";", 1)[0].strip()


def _get(source: HttpSource, relative: str, limits: Limits) -> bytes:
    try:
        return source.get(relative, limits.max_manifest_bytes)
    except FetchError as exc:
        raise ManifestUnavailable(f"manifest: {exc}") from None
    finally:
        source.close()


def _from_sources(digest: str, sources: Sequence[ChunkSource], limits: Limits) -> LoadedManifest:
    errors = []
    bad = False
    for source in sources:
        try:
            data = source.get(layout.manifest_path(digest), limits.max_manifest_bytes)
            return _decode(f"{source.name}/{layout.manifest_path(digest)}", data, digest, limits, None)
        except FetchError as exc:
            errors.append(f"{source.name}: {exc}")
        except BadManifest as exc:  # that source serves wrong bytes; another may not
            errors.append(str(exc))
            bad = True
    error = BadManifest if bad else ManifestUnavailable
    raise error(f"manifest {digest}: no source has it ({'; '.join(errors) or 'no sources'})")


def _decode(where: str, data: bytes, pin: str | None, limits: Limits, store: str | None) -> LoadedManifest:
    digest = manifest_digest(data)
    if pin is not None and digest != pin:
        raise BadManifest(f"manifest {where}: expected blake3 {pin}, got {digest}; refusing it")
    try:
        manifest = decode(data, limits)
    except ManifestError as exc:
        raise BadManifest(f"manifest {where}: {exc}") from None
    return LoadedManifest(manifest, digest, pin is not None, store)
