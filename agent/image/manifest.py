"""The image manifest: canonical msgpack, a strict bounded decoder, digest identity.

Wire layout (docs/image-format.md has a worked example). The top level is a map
whose keys are in bytewise order and every value is minimally encoded:

    {"chunk_size": int, "chunks": [[digest, kind, encoding, stored_len], ...],
     "format": 1, "image_size": int,
     "meta": {"created": int, "labels": {str: str}, "name": str,
              "source_format": str, "version": str}}

The decoder streams the chunk table into compact arrays, so a hostile file can
cost no more memory than its own size plus a small constant per chunk, and it
re-encodes every piece it reads and compares bytes: any non-canonical input
(key order, integer width, duplicate keys, trailing bytes) is refused.
"""

from __future__ import annotations

import array
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import blake3
import msgpack

from agent.errors import FieldError
from agent.image.errors import ImageError

FORMAT_VERSION = 1
DIGEST_SIZE = 32
MIN_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_CHUNK_SIZE = 4 << 20


class ChunkKind(enum.IntEnum):
    DATA = 0
    ZERO = 1


class Encoding(enum.IntEnum):
    RAW = 0
    ZSTD = 1


@dataclass(frozen=True)
class Limits:
    """Bounds the decoder enforces before trusting any size in the file."""

    max_manifest_bytes: int = 96 << 20
    max_chunks: int = 1 << 21
    max_image_size: int = 1 << 50
    max_str_len: int = 1024
    max_labels: int = 64


DEFAULT_LIMITS = Limits()


class ManifestError(FieldError, ImageError):
    """A manifest that is not valid; names the field, what was expected and what was found."""

    label = "manifest field {field!r}"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of an image: where it goes, what it hashes to, how it is stored."""

    index: int
    offset: int
    length: int
    digest: bytes
    kind: ChunkKind
    encoding: Encoding
    stored_len: int

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def describe(self) -> str:
        return f"chunk {self.index} (offset {self.offset}, blake3 {self.hex})"


@dataclass(frozen=True)
class Metadata:
    name: str
    version: str
    created: int = 0
    source_format: str = "raw"
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "labels": {k: self.labels[k] for k in sorted(self.labels)},
            "name": self.name,
            "source_format": self.source_format,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    """A chunk table row as the importer produces it (offsets follow from the index)."""

    digest: bytes
    kind: ChunkKind
    encoding: Encoding
    stored_len: int


def zero_digest(length: int) -> bytes:
    return blake3.blake3(bytes(length)).digest()


def chunk_count(image_size: int, chunk_size: int) -> int:
    return -(-image_size // chunk_size)


class Manifest:
    """A decoded (or freshly built) manifest; the chunk table is held compactly."""

    def __init__(
        self,
        image_size: int,
        chunk_size: int,
        meta: Metadata,
        digests: bytes,
        kinds: bytes,
        encodings: bytes,
        stored: array.array[int],
    ) -> None:
        self.image_size = image_size
        self.chunk_size = chunk_size
        self.meta = meta
        self._digests = digests
        self._kinds = kinds
        self._encodings = encodings
        self._stored = stored

    @classmethod
    def build(cls, image_size: int, chunk_size: int, meta: Metadata, entries: list[ChunkEntry]) -> Manifest:
        """Build from importer output and check it the way the decoder would."""
        stored = array.array("Q", (e.stored_len for e in entries))
        manifest = cls(
            image_size,
            chunk_size,
            meta,
            b"".join(e.digest for e in entries),
            bytes(e.kind for e in entries),
            bytes(e.encoding for e in entries),
            stored,
        )
        decode(manifest.encode())  # the same checks as any reader applies
        return manifest

    def __len__(self) -> int:
        return len(self._kinds)

    def chunk(self, index: int) -> Chunk:
        if not 0 <= index < len(self):
            raise IndexError(f"chunk index {index} out of range 0..{len(self) - 1}")
        offset = index * self.chunk_size
        return Chunk(
            index=index,
            offset=offset,
            length=min(self.chunk_size, self.image_size - offset),
            digest=self._digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE],
            kind=ChunkKind(self._kinds[index]),
            encoding=Encoding(self._encodings[index]),
            stored_len=self._stored[index],
        )

    def __iter__(self) -> Iterator[Chunk]:
        return (self.chunk(i) for i in range(len(self)))

    def data_chunks(self) -> Iterator[Chunk]:
        return (c for c in self if c.kind is ChunkKind.DATA)

    @property
    def data_size(self) -> int:
        """Bytes of the image held in data chunks (the rest is zero)."""
        return sum(c.length for c in self.data_chunks())

    @property
    def stored_size(self) -> int:
        return sum(self._stored)

    def encode(self) -> bytes:
        return _encode_canonical(self)

    @cached_property
    def digest(self) -> str:
        """The manifest's identity: blake3-256 of its canonical bytes, in hex."""
        return blake3.blake3(self.encode()).hexdigest()


def _encode_canonical(m: Manifest) -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    parts = [
        packer.pack_map_header(5),
        packer.pack("chunk_size"),
        packer.pack(m.chunk_size),
        packer.pack("chunks"),
        packer.pack_array_header(len(m)),
    ]
    digests, kinds, encodings, stored = m._digests, m._kinds, m._encodings, m._stored
    for i in range(len(m)):
        parts.append(
            packer.pack(
                [
                    digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE],
                    kinds[i],
                    encodings[i],
                    stored[i],
                ]
            )
        )
    parts += [
        packer.pack("format"),
        packer.pack(FORMAT_VERSION),
        packer.pack("image_size"),
        packer.pack(m.image_size),
        packer.pack("meta"),
        packer.pack(m.meta.to_wire()),
    ]
    return b"".join(parts)


def manifest_digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, expect_digest: str | None = None) -> Manifest:
    """Decode and validate canonical manifest bytes; raise ManifestError naming the bad field."""
    if len(data) > limits.max_manifest_bytes:
        raise ManifestError("<manifest>", f"at most {limits.max_manifest_bytes} bytes", len(data))
    if expect_digest is not None:
        actual = manifest_digest(data)
        if actual != expect_digest.lower():
            raise ManifestError("<digest>", f"blake3 {expect_digest}", actual)
    return _Decoder(data, limits).run()


class _Decoder:
    _KEYS = ("chunk_size", "chunks", "format", "image_size", "meta")

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
        self.limits = limits
        self.packer = msgpack.Packer(use_bin_type=True)
        self.up = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_buffer_size=max(len(data), 1),
            max_bin_len=DIGEST_SIZE,
            max_str_len=limits.max_str_len,
            max_array_len=max(limits.max_chunks, 4),
            max_map_len=max(limits.max_labels, 8),
            max_ext_len=0,
        )
        self.up.feed(data)

    def _read(self, field_name: str) -> tuple[Any, bytes]:
        start = self.up.tell()
        try:
            value = self.up.unpack()
        except msgpack.OutOfData:
            raise ManifestError(field_name, "a value", "end of data (truncated)") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ManifestError(field_name, "well-formed msgpack within limits", str(exc)) from None
        return value, self.data[start : self.up.tell()]

    def _canonical(self, field_name: str, raw: bytes, canonical: bytes) -> None:
        if raw != canonical:
            raise ManifestError(field_name, "canonical msgpack encoding", raw[:16].hex())

    def _header(self, field_name: str, kind: str) -> int:
        start = self.up.tell()
        try:
            n: int
            if kind == "map":
                n = self.up.read_map_header()
                canonical = self.packer.pack_map_header(n)
            else:
                n = self.up.read_array_header()
                canonical = self.packer.pack_array_header(n)
        except msgpack.OutOfData:
            raise ManifestError(field_name, f"a {kind}", "end of data (truncated)") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ManifestError(field_name, f"a {kind}", str(exc)) from None
        self._canonical(field_name, self.data[start : self.up.tell()], canonical)
        return n

    def _int(self, field_name: str, lo: int, hi: int) -> int:
        value, raw = self._read(field_name)
        if type(value) is not int or not lo <= value <= hi:
            raise ManifestError(field_name, f"an integer in [{lo}, {hi}]", value)
        self._canonical(field_name, raw, self.packer.pack(value))
        return value

    def run(self) -> Manifest:
        n = self._header("<manifest>", "map")
        if n != len(self._KEYS):
            raise ManifestError("<manifest>", f"a map of the {len(self._KEYS)} keys {self._KEYS}", n)
        values: dict[str, Any] = {}
        for expected_key in self._KEYS:
            key, raw = self._read("<key>")
            if key != expected_key:
                raise ManifestError("<key>", f"{expected_key!r} (keys in canonical order)", key)
            self._canonical(expected_key, raw, self.packer.pack(key))
            values[key] = getattr(self, "_field_" + key)(values)
        if self.up.tell() != len(self.data):
            extra = len(self.data) - self.up.tell()
            raise ManifestError("<manifest>", "no bytes after the top-level map", f"{extra} trailing")
        return self._finish(values)

    def _field_chunk_size(self, values: dict[str, Any]) -> int:
        size = self._int("chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        if size & (size - 1):
            raise ManifestError("chunk_size", "a power of two from 1 MiB to 64 MiB", size)
        return size

    def _field_chunks(self, values: dict[str, Any]) -> tuple[bytes, bytes, bytes, array.array[int]]:
        n = self._header("chunks", "array")
        if n > self.limits.max_chunks:
            raise ManifestError("chunks", f"at most {self.limits.max_chunks} chunks", n)
        chunk_size: int = values["chunk_size"]
        digests, kinds, encodings = bytearray(), bytearray(), bytearray()
        stored: array.array[int] = array.array("Q")
        for i in range(n):
            name = f"chunks[{i}]"
            entry, raw = self._read(name)
            if not (isinstance(entry, list) and len(entry) == 4):
                raise ManifestError(name, "[digest, kind, encoding, stored_len]", entry)
            digest, kind, encoding, stored_len = entry
            if not (isinstance(digest, bytes) and len(digest) == DIGEST_SIZE):
                raise ManifestError(name + ".digest", f"{DIGEST_SIZE} bytes of blake3", digest)
            if type(kind) is not int or kind not in (0, 1):
                raise ManifestError(name + ".kind", "0 (data) or 1 (zero)", kind)
            if type(encoding) is not int or encoding not in (0, 1):
                raise ManifestError(name + ".encoding", "0 (raw) or 1 (zstd)", encoding)
            if type(stored_len) is not int or not 0 <= stored_len <= chunk_size:
                raise ManifestError(name + ".stored_len", f"an integer in [0, {chunk_size}]", stored_len)
            self._canonical(name, raw, self.packer.pack(entry))
            digests += digest
            kinds.append(kind)
            encodings.append(encoding)
            stored.append(stored_len)
        return bytes(digests), bytes(kinds), bytes(encodings), stored

    def _field_format(self, values: dict[str, Any]) -> int:
        value, raw = self._read("format")
        if value != FORMAT_VERSION or type(value) is not int:
            raise ManifestError("format", f"format version {FORMAT_VERSION}", value)
        self._canonical("format", raw, self.packer.pack(value))
        return FORMAT_VERSION

    def _field_image_size(self, values: dict[str, Any]) -> int:
        return self._int("image_size", 1, self.limits.max_image_size)

    def _field_meta(self, values: dict[str, Any]) -> Metadata:
        value, raw = self._read("meta")
        if not isinstance(value, dict) or sorted(value) != [
            "created",
            "labels",
            "name",
            "source_format",
            "version",
        ]:
            raise ManifestError("meta", "a map of created, labels, name, source_format, version", value)
        for key in ("name", "version", "source_format"):
            if not isinstance(value[key], str):
                raise ManifestError("meta." + key, "a string", value[key])
        if not value["name"]:
            raise ManifestError("meta.name", "a non-empty string", value["name"])
        if type(value["created"]) is not int or not 0 <= value["created"] < 1 << 63:
            raise ManifestError("meta.created", "unix seconds as a non-negative integer", value["created"])
        labels = value["labels"]
        if not isinstance(labels, dict) or len(labels) > self.limits.max_labels:
            raise ManifestError("meta.labels", f"a map of at most {self.limits.max_labels} labels", labels)
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ManifestError(f"meta.labels[{k!r}]", "string keys and values", v)
        meta = Metadata(value["name"], value["version"], value["created"], value["source_format"], labels)
        self._canonical("meta", raw, self.packer.pack(meta.to_wire()))
        return meta

    def _finish(self, values: dict[str, Any]) -> Manifest:
        image_size: int = values["image_size"]
        chunk_size: int = values["chunk_size"]
        digests, kinds, encodings, stored = values["chunks"]
        expected = chunk_count(image_size, chunk_size)
        if len(kinds) != expected:
            raise ManifestError(
                "chunks",
                f"{expected} chunks for an image of {image_size} bytes in {chunk_size}-byte chunks",
                len(kinds),
            )
        manifest = Manifest(image_size, chunk_size, values["meta"], digests, kinds, encodings, stored)
        zero_digests: dict[int, bytes] = {}
        for chunk in manifest:
            _check_entry(chunk, zero_digests)
        return manifest


def _check_entry(chunk: Chunk, zero_digests: dict[int, bytes]) -> None:
    name = f"chunks[{chunk.index}]"
    if chunk.kind is ChunkKind.ZERO:
        if chunk.encoding is not Encoding.RAW or chunk.stored_len != 0:
            raise ManifestError(name, "a zero chunk stored nowhere (raw, stored_len 0)", chunk.stored_len)
        if chunk.length not in zero_digests:
            zero_digests[chunk.length] = zero_digest(chunk.length)
        if chunk.digest != zero_digests[chunk.length]:
            raise ManifestError(name + ".digest", "the blake3 of zeros for a zero chunk", chunk.hex)
    elif chunk.encoding is Encoding.RAW:
        if chunk.stored_len != chunk.length:
            raise ManifestError(
                name + ".stored_len", f"{chunk.length} (the chunk length) for raw", chunk.stored_len
            )
    elif not 0 < chunk.stored_len < chunk.length:
        raise ManifestError(
            name + ".stored_len", f"fewer than {chunk.length} bytes for zstd", chunk.stored_len
        )
