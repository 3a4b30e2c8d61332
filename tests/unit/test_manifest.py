from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.image.manifest import (
    ChunkEntry,
    ChunkKind,
    Encoding,
    Limits,
    Manifest,
    ManifestError,
    Metadata,
    decode,
    manifest_digest,
    zero_digest,
)

MiB = 1 << 20


def make(image_size: int = 10 * MiB, chunk_size: int = 4 * MiB, zero: set[int] | None = None) -> Manifest:
    zero = zero or set()
    n = -(-image_size // chunk_size)
    entries = []
    for i in range(n):
        length = min(chunk_size, image_size - i * chunk_size)
        if i in zero:
            entries.append(ChunkEntry(zero_digest(length), ChunkKind.ZERO, Encoding.RAW, 0))
        elif i % 2:
            entries.append(ChunkEntry(bytes([i % 256]) * 32, ChunkKind.DATA, Encoding.ZSTD, length // 3))
        else:
            entries.append(ChunkEntry(bytes([i % 256]) * 32, ChunkKind.DATA, Encoding.RAW, length))
    meta = Metadata("debian", "12.1", 1700000000, "qcow2", {"arch": "amd64", "os": "debian"})
    return Manifest.build(image_size, chunk_size, meta, entries)


def wire(m: Manifest) -> dict:
    return msgpack.unpackb(m.encode(), raw=False)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_round_trip_and_identity() -> None:
    m = make(zero={1})
    data = m.encode()
    back = decode(data, expect_digest=m.digest)
    assert back.encode() == data
    assert back.digest == m.digest == manifest_digest(data)
    assert len(back) == 3
    last = back.chunk(2)
    assert (last.offset, last.length) == (8 * MiB, 2 * MiB)
    assert back.chunk(1).kind is ChunkKind.ZERO
    assert back.meta.labels == {"arch": "amd64", "os": "debian"}
    assert back.data_size == 6 * MiB


def test_digest_changes_with_any_field() -> None:
    a = make()
    b = make(zero={0})
    assert a.digest != b.digest


def test_wrong_expected_digest_is_refused() -> None:
    m = make()
    with pytest.raises(ManifestError, match="<digest>"):
        decode(m.encode(), expect_digest="0" * 64)


def mutate(m: Manifest, **changes: object) -> bytes:
    w = wire(m)
    w.update(changes)
    return pack(dict(sorted(w.items())))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"format": 2}, "format"),
        ({"chunk_size": 3 * MiB}, "chunk_size"),
        ({"chunk_size": 128 * MiB}, "chunk_size"),
        ({"chunk_size": 512 * 1024}, "chunk_size"),
        ({"image_size": 13 * MiB}, "chunks"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": -1}, "image_size"),
        ({"image_size": "10"}, "image_size"),
        ({"meta": {"name": "x"}}, "meta"),
    ],
)
def test_bad_fields_are_named(changes: dict, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        decode(mutate(make(), **changes))
    assert info.value.field == field
    assert field in str(info.value) and "expected" in str(info.value)


def test_chunk_entry_errors_name_the_chunk() -> None:
    w = wire(make())
    w["chunks"][1][3] = 4 * MiB  # zstd not smaller than raw
    with pytest.raises(ManifestError, match=r"chunks\[1\]\.stored_len"):
        decode(pack(w))
    w = wire(make())
    w["chunks"][2][0] = b"short"
    with pytest.raises(ManifestError, match=r"chunks\[2\]\.digest"):
        decode(pack(w))
    w = wire(make(zero={0}))
    w["chunks"][0][0] = b"\1" * 32  # a zero chunk must hash to zeros
    with pytest.raises(ManifestError, match=r"chunks\[0\]\.digest"):
        decode(pack(w))
    w = wire(make())
    w["chunks"][0][1] = 7
    with pytest.raises(ManifestError, match=r"chunks\[0\]\.kind"):
        decode(pack(w))


def test_non_canonical_encodings_are_refused() -> None:
    m = make()
    w = wire(m)
    # keys out of order
    with pytest.raises(ManifestError, match="canonical order"):
        decode(pack(dict(reversed(list(w.items())))))
    # an integer in a wider encoding than needed (uint64 for image_size)
    data = m.encode()
    packed_size = pack(m.image_size)
    wide = b"\xcf" + m.image_size.to_bytes(8, "big")
    assert data.count(packed_size) >= 1
    i = data.index(b"\xaaimage_size") + len(b"\xaaimage_size")
    with pytest.raises(ManifestError, match="canonical"):
        decode(data[:i] + wide + data[i + len(packed_size) :])
    # trailing bytes
    with pytest.raises(ManifestError, match="trailing"):
        decode(data + b"\x00")
    # labels out of order
    w["meta"]["labels"] = {"z": "1", "a": "2"}
    with pytest.raises(ManifestError, match="meta"):
        decode(pack(w))


def test_limits_bound_memory_before_trusting_counts() -> None:
    m = make(image_size=64 * MiB, chunk_size=1 * MiB)
    with pytest.raises(ManifestError, match=r"at most 8 chunks|within limits"):
        decode(m.encode(), Limits(max_chunks=8))
    with pytest.raises(ManifestError, match="<manifest>"):
        decode(m.encode(), Limits(max_manifest_bytes=100))
    # a hostile header claiming 4 billion chunks fails fast, without allocating them
    hostile = pack("chunk_size") + pack(MiB) + pack("chunks") + b"\xdd\xff\xff\xff\xff"
    with pytest.raises(ManifestError, match="chunks"):
        decode(b"\x85" + hostile)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_truncation_is_refused(data: st.DataObject) -> None:
    encoded = make(zero={1}).encode()
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ManifestError):
        decode(encoded[:cut])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_mutation_is_refused_or_is_a_different_valid_manifest(data: st.DataObject) -> None:
    m = make(zero={1})
    encoded = bytearray(m.encode())
    pos = data.draw(st.integers(0, len(encoded) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != encoded[pos]))
    encoded[pos] = new
    try:
        back = decode(bytes(encoded))
    except ManifestError as exc:
        assert "expected" in str(exc)
        return
    # Some byte flips (inside a digest, a label) still give a valid manifest:
    # then it is canonical and has a different identity, so a job pinned to the
    # original digest would refuse it.
    assert back.encode() == bytes(encoded)
    assert back.digest != m.digest
    with pytest.raises(ManifestError, match="<digest>"):
        decode(bytes(encoded), expect_digest=m.digest)


@settings(max_examples=100, deadline=None)
@given(
    image_size=st.integers(1, 300 * MiB),
    shift=st.integers(20, 26),
    name=st.text(min_size=1, max_size=40),
    labels=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5),
    zero_mask=st.integers(0, 2**64),
)
def test_built_manifests_round_trip(
    image_size: int, shift: int, name: str, labels: dict[str, str], zero_mask: int
) -> None:
    cs = 1 << shift
    n = -(-image_size // cs)
    entries = []
    for i in range(n):
        length = min(cs, image_size - i * cs)
        if zero_mask >> (i % 64) & 1:
            entries.append(ChunkEntry(zero_digest(length), ChunkKind.ZERO, Encoding.RAW, 0))
        else:
            entries.append(ChunkEntry(i.to_bytes(32, "big"), ChunkKind.DATA, Encoding.RAW, length))
    m = Manifest.build(image_size, cs, Metadata(name, "v", 0, "raw", labels), entries)
    back = decode(m.encode(), expect_digest=m.digest)
    assert [c for c in back] == [c for c in m]
    assert back.meta == m.meta
