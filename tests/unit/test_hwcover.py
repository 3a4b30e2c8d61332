"""initramfs/hwcover: only the firmware files modules ask for are copied, never from outside the
firmware tree; modules.alias is read into vendor:device pairs, classes and vendor-wide bindings."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_hwcover() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("hwcover", str(REPO / "initramfs" / "hwcover"))
    spec = importlib.util.spec_from_loader("hwcover", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hwcover"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


hw = load_hwcover()


def test_only_asked_for_firmware_inside_the_tree_is_copied(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "intel" / "ice" / "ddp").mkdir(parents=True)
    (src / "intel" / "ice" / "ddp" / "ice-1.3.30.0.pkg").write_bytes(b"ddp")
    (src / "intel" / "ice" / "ddp" / "ice.pkg").symlink_to("ice-1.3.30.0.pkg")
    (src / "unasked.bin").write_bytes(b"x")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not firmware")
    (src / "escape.bin").symlink_to(secret)
    drivers = [
        hw.Driver("ice", "ice.ko", ("intel/ice/ddp/ice.pkg",)),
        hw.Driver("evil", "evil.ko", ("escape.bin", "../secret", "/etc/passwd", "missing.fw", "a/*")),
    ]
    present = hw.copy_firmware(drivers, src, dst)
    assert present == {
        "intel/ice/ddp/ice.pkg": True,
        "escape.bin": False,
        "../secret": False,
        "/etc/passwd": False,
        "missing.fw": False,
        "a/*": False,
    }
    copied = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert copied == ["intel/ice/ddp/ice.pkg"]
    ice = dst / "intel" / "ice" / "ddp" / "ice.pkg"
    assert not ice.is_symlink() and ice.read_bytes() == b"ddp"


def test_aliases_are_read_into_pairs_classes_and_vendors(tmp_path: Path) -> None:
    (tmp_path / "modules.alias").write_text(
        "# Aliases extracted from modules themselves.\n"
        "alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n"
        "alias pci:v00008086d000010D3sv*sd*bc*sc*i* other\n"
        "alias pci:v*d*sv*sd*bc01sc06i01* ahci\n"
        "alias pci:v*d*sv*sd*bc01sc08i02* nvme\n"
        "alias pci:v000015B3d*sv*sd*bc*sc*i* mlx_any\n"
        "alias usb:v0781p5567d*dc*dsc*dp*ic*isc*ip*in* usb_storage\n"
    )
    coverage = hw.read_coverage(tmp_path)
    assert coverage.pci_ids == {("8086", "10d3"): {"e1000e", "other"}}
    assert coverage.pci_classes == {"bc01sc06i01": {"ahci"}, "bc01sc08i02": {"nvme"}}
    assert coverage.vendor_wide == {"15b3": {"mlx_any"}}


def test_the_report_counts_drivers_without_any_of_their_firmware() -> None:
    drivers = [
        hw.Driver("bnx2x", "b.ko", ("old.fw", "new.fw")),
        hw.Driver("nfp", "n.ko", ("a.nffw",)),
        hw.Driver("e1000", "e.ko", ()),
    ]
    present = {"old.fw": False, "new.fw": True, "a.nffw": False}
    summary, text = hw.render(drivers, present, hw.Coverage({}, {}, {}))
    assert "2 drivers ask for firmware, 1 of them have none of it; 1 firmware files shipped" in summary
    assert "bnx2x (b.ko): some, 1/2\n    - old.fw\n    + new.fw" in text
    assert "nfp (n.ko): NONE, 0/1" in text
