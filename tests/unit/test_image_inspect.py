"""The image inspector's pure parsers: table tests over hand-built headers, and a fuzz."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.images.inspect import BytesBlob, Facts, ImageRefused, detect_format, inspect_image
from controller.images.inspect_vmdk import parse_descriptor
from controller.images.sandbox import SandboxedImage, SandboxLayer
from tests import crafted

MiB = 1 << 20


def inspect(data: bytes, declared: str | None = None) -> Facts:
    return inspect_image(BytesBlob(data), declared)


def refused(data: bytes, declared: str | None = None) -> ImageRefused:
    with pytest.raises(ImageRefused) as info:
        inspect(data, declared)
    return info.value


GOOD = [
    ("qcow2 v3", crafted.qcow2(5 * MiB), Facts("qcow2", 5 * MiB)),
    ("qcow2 v2", crafted.qcow2(MiB, version=2), Facts("qcow2", MiB)),
    ("qcow2 dirty + extended L2", crafted.qcow2(MiB, incompat=0b10001), Facts("qcow2", MiB)),
    (
        "qcow2 backing (left to the chain policy)",
        crafted.qcow2(MiB, backing=b"base.raw", backing_format=b"raw"),
        Facts("qcow2", MiB, "base.raw", "raw"),
    ),
    ("vmdk monolithicSparse", crafted.vmdk_sparse(4096), Facts("vmdk", 4096 * 512)),
    (
        "vmdk streamOptimized, footer",
        crafted.vmdk_sparse(2048, crafted.vmdk_descriptor("streamOptimized"), gd_at_end=True),
        Facts("vmdk", 2048 * 512),
    ),
    ("vmdk without descriptor", crafted.vmdk_sparse(2048, b""), Facts("vmdk", 2048 * 512)),
    ("vhdx", crafted.vhdx_image(8 * MiB), Facts("vhdx", 8 * MiB)),
    ("vdi dynamic", crafted.vdi(1, 3 * MiB), Facts("vdi", 3 * MiB)),
    ("vdi fixed", crafted.vdi(2, MiB), Facts("vdi", MiB)),
    ("raw", b"\x01" * 4096, Facts("raw", 4096)),
]


@pytest.mark.parametrize(("case", "data", "facts"), GOOD, ids=[g[0] for g in GOOD])
def test_well_formed_headers(case: str, data: bytes, facts: Facts) -> None:
    assert inspect(data) == facts


# (case, bytes, declared format, words the refusal must carry, the reference it must name)
BAD = [
    ("qcow2 data file", crafted.qcow2(data_file=b"/etc/shadow"), None, "external data file", "/etc/shadow"),
    ("qcow2 data-file bit, no name", crafted.qcow2(incompat=4), None, "external data file", "<unnamed>"),
    ("qcow2 data_file_raw", crafted.qcow2(autoclear=2), None, "data_file_raw", "<unnamed>"),
    ("qcow2 unknown incompatible", crafted.qcow2(incompat=1 << 9), None, "unknown incompatible", "0x200"),
    ("qcow2 encrypted", crafted.qcow2(crypt=2), None, "encrypted", "2"),
    ("qcow2 version 4", crafted.qcow2(version=4), None, "unknown version", "4"),
    ("qcow2 cluster bits", crafted.qcow2(cluster_bits=22), None, "cluster bits", "22"),
    ("qcow2 truncated", crafted.qcow2()[:40], None, "too short", "40"),
    (
        "vmdk text descriptor (monolithicFlat)",
        crafted.vmdk_descriptor("monolithicFlat", 'RW 2048 FLAT "/etc/shadow" 0'),
        None,
        "text descriptor",
        "/etc/shadow",
    ),
    (
        "vmdk text descriptor declared, no header line",
        b'version=1\ncreateType="vmfs"\nRW 8 VMFS "/root/key"\n',
        "vmdk",
        "declared format does not match",
        "raw",
    ),
    (
        "vmdk capacity 0 reads the embedded extents",
        crafted.vmdk_sparse(0, crafted.vmdk_descriptor("monolithicFlat", 'RW 2048 FLAT "/etc/shadow" 0')),
        None,
        "capacity 0",
        "/etc/shadow",
    ),
    (
        "vmdk streamOptimized footer of capacity 0",
        crafted.vmdk_sparse(
            2048,
            crafted.vmdk_descriptor("monolithicFlat", 'RW 2048 FLAT "/etc/shadow" 0'),
            gd_at_end=True,
            footer_capacity=0,
        ),
        None,
        "capacity 0",
        "/etc/shadow",
    ),
    (
        "vmdk parent",
        crafted.vmdk_sparse(2048, crafted.vmdk_descriptor(extra='parentFileNameHint="/srv/base.vmdk"')),
        None,
        "parentFileNameHint",
        "/srv/base.vmdk",
    ),
    (
        "vmdk parent hint in qemu's area, no descriptor offset",
        crafted.vmdk_sparse(2048, b'parentFileNameHint="/srv/p.vmdk"\n')[:28]
        + bytes(16)
        + crafted.vmdk_sparse(2048, b'parentFileNameHint="/srv/p.vmdk"\n')[44:],
        None,
        "parentFileNameHint",
        "/srv/p.vmdk",
    ),
    (
        "vmdk embedded createType vmfs",
        crafted.vmdk_sparse(2048, crafted.vmdk_descriptor("vmfs", 'RW 2048 VMFS "disk-flat.vmdk"')),
        None,
        "createType",
        "vmfs",
    ),
    (
        "vmdk embedded descriptor with a second extent",
        crafted.vmdk_sparse(
            2048, crafted.vmdk_descriptor(extents='RW 2048 SPARSE "x.vmdk"\nRW 2048 FLAT "/etc/shadow" 0')
        ),
        None,
        "extents besides its own",
        "/etc/shadow",
    ),
    ("vmdk version 4", crafted.vmdk_sparse(2048, version=4), None, "version", "4"),
    ("vmdk3 (COWD)", b"COWD" + bytes(2044), None, "allow-list", None),
    (
        "vhdx differencing",
        crafted.vhdx_image(
            parent_locator={"relative_path": "..\\base.vhdx", "absolute_win32_path": "C:\\b.vhdx"}
        ),
        None,
        "parent locator",
        "relative_path=..\\base.vhdx, absolute_win32_path=C:\\b.vhdx",
    ),
    ("vhdx HasParent flag", crafted.vhdx_image(file_flags=2), None, "HasParent", None),
    (
        "vhdx unknown required item",
        crafted.vhdx_image(unknown_item_required=True),
        None,
        "required metadata",
        None,
    ),
    (
        "vhdx unknown required region",
        crafted.vhdx_image(unknown_region_required=True),
        None,
        "required region",
        None,
    ),
    ("vhdx truncated", crafted.vhdx_image()[: 192 * 1024 + 20], None, "too short", None),
    ("vdi differencing", crafted.vdi(4, parent=b"\x11" * 16), None, "parent image", "11" * 16),
    ("vdi undo", crafted.vdi(3), None, "parent image", None),
    ("vpc", b"conectix" + bytes(504), None, "allow-list", None),
    ("qed", b"QED\x00" + bytes(508), None, "allow-list", None),
    ("declared qcow2, file is vmdk", crafted.vmdk_sparse(), "qcow2", "does not match", "vmdk"),
    ("declared vhdx, file is raw", bytes(4096), "vhdx", "does not match", "raw"),
    ("declared qed", crafted.qcow2(), "qed", "allow-list", None),
]


@pytest.mark.parametrize(("case", "data", "declared", "words", "reference"), BAD, ids=[b[0] for b in BAD])
def test_refusals_name_format_reason_and_reference(
    case: str, data: bytes, declared: str | None, words: str, reference: str | None
) -> None:
    exc = refused(data, declared)
    assert words in str(exc)
    if reference is not None:
        assert exc.reference is not None and reference in exc.reference
    assert str(exc.at("/srv/img")).startswith(f"image /srv/img ({exc.format}) refused: ")


def test_declared_raw_is_never_interpreted() -> None:
    evil = crafted.qcow2(data_file=b"/etc/shadow")
    assert detect_format(BytesBlob(evil)) == "qcow2"
    assert inspect(evil, "raw") == Facts("raw", len(evil))


def test_descriptor_parser_reads_every_extent() -> None:
    text = crafted.vmdk_descriptor(
        "twoGbMaxExtentFlat", 'RW 4 FLAT "a-f001.vmdk" 0\nRDONLY 4 FLAT "/b" 0\nRW 8 ZERO', "ddb.x = 1"
    )
    d = parse_descriptor(text)
    assert d.create_type == "twoGbMaxExtentFlat"
    assert d.extents == (("FLAT", "a-f001.vmdk"), ("FLAT", "/b"), ("ZERO", ""))
    assert d.parent_hint is None


def test_node_graph_pins_every_layer_and_ends_in_null() -> None:
    image = SandboxedImage((SandboxLayer(5, False, "qcow2"), SandboxLayer(6, True, "raw")))
    assert image.target() == (
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"/sledge/0"},'
        '"backing":{"driver":"raw","file":{"driver":"host_device","filename":"/sledge/1"}}}'
    )
    loose = SandboxedImage((SandboxLayer(5, False, "vmdk"),), pin_nodes=False)
    assert "backing" not in loose.target()


SEEDS = [g[1] for g in GOOD if g[0] != "raw"] + [b[1] for b in BAD]
# where the parsers look: headers, vmdk descriptors, vhdx region table and metadata
HOT = [0, 64, 512, 192 << 10, 1 << 20, (1 << 20) + (64 << 10)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.sampled_from(HOT), st.integers(0, 255), st.binary(min_size=1, max_size=8)), max_size=6
    ),
    cut=st.integers(0, 1 << 21),
    declared=st.sampled_from([None, "qcow2", "vmdk", "vhdx", "vdi", "raw"]),
)
def test_hostile_headers_never_traceback(
    seed: bytes, edits: list[tuple[int, int, bytes]], cut: int, declared: str | None
) -> None:
    data = bytearray(seed[:cut])
    for base, offset, patch in edits:
        data[base + offset : base + offset + len(patch)] = patch
    try:
        facts = inspect(bytes(data), declared)
    except ImageRefused as exc:
        assert str(exc)
    else:
        assert facts.virtual_size >= 0
        assert facts.format in ("raw", "qcow2", "vmdk", "vhdx", "vdi")


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2048), st.sampled_from([b"QFI\xfb", b"KDMV", b"vhdxfile", b"# Disk DescriptorFile"])
)
def test_random_bytes_after_a_magic_never_traceback(tail: bytes, magic: bytes) -> None:
    with contextlib.suppress(ImageRefused):
        inspect(magic + tail)


def test_vdi_signature_lives_at_64() -> None:
    head = crafted.vdi()
    assert struct.unpack_from("<I", head, 64)[0] == 0xBEDA107F
    assert detect_format(BytesBlob(head)) == "vdi"
