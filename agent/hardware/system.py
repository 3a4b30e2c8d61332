"""System identity (DMI), firmware and boot mode, CPU topology and memory."""

from __future__ import annotations

import os
import re
import struct

from agent.hardware.model import Cpu, Dimm, Memory, System
from agent.hardware.tree import Tree

SECURE_BOOT_VAR = "firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"

# SMBIOS memory types (type 17, offset 0x12) worth naming; the rest are reported by number
_MEMORY_TYPES = {
    0x07: "RAM", 0x0F: "SDRAM", 0x12: "DDR", 0x13: "DDR2", 0x18: "DDR3", 0x1A: "DDR4", 0x1B: "LPDDR",
    0x1C: "LPDDR2", 0x1D: "LPDDR3", 0x1E: "LPDDR4", 0x20: "HBM", 0x21: "HBM2", 0x22: "DDR5",
    0x23: "LPDDR5",
}  # fmt: skip


def collect_system(sys: Tree, proc: Tree) -> System:
    dmi = "class/dmi/id"
    efi = sys.exists("firmware/efi")
    secure_boot = None
    if efi:
        var = sys.raw(SECURE_BOOT_VAR)
        # 4 bytes of EFI variable attributes, then the one-byte value
        secure_boot = None if var is None or len(var) < 5 else var[4] == 1
    return System(
        vendor=sys.text(f"{dmi}/sys_vendor"),
        product=sys.text(f"{dmi}/product_name"),
        serial=sys.text(f"{dmi}/product_serial"),
        uuid=sys.text(f"{dmi}/product_uuid"),
        firmware_vendor=sys.text(f"{dmi}/bios_vendor"),
        firmware_version=sys.text(f"{dmi}/bios_version"),
        firmware_date=sys.text(f"{dmi}/bios_date"),
        boot_mode="uefi" if efi else "bios",
        secure_boot=secure_boot,
        hostname=proc.text("sys/kernel/hostname"),
    )


def _cpuinfo(proc: Tree) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    for block in (proc.text("cpuinfo") or "").split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entry[key.strip()] = value.strip()
        if entry:
            blocks.append(entry)
    return blocks


def collect_cpu(sys: Tree, proc: Tree) -> Cpu:
    info = _cpuinfo(proc)
    processors = [b for b in info if "processor" in b]
    first = processors[0] if processors else (info[0] if info else {})
    model = next((first[k] for k in ("model name", "Processor", "cpu model", "cpu") if first.get(k)), None)
    flags = tuple(sorted((first.get("flags") or first.get("Features") or "").split()))

    # sysfs topology works on every architecture; cpuinfo's ids are x86-only
    packages: set[str] = set()
    cores: set[tuple[str, str]] = set()
    threads = 0
    for entry in sys.list("devices/system/cpu"):
        if not re.fullmatch(r"cpu\d+", entry) or not sys.exists(f"devices/system/cpu/{entry}/topology"):
            continue
        threads += 1
        package = sys.text(f"devices/system/cpu/{entry}/topology/physical_package_id") or "0"
        packages.add(package)
        cores.add((package, sys.text(f"devices/system/cpu/{entry}/topology/core_id") or entry))
    if threads == 0:
        threads = len(processors) or 1
        packages = {b.get("physical id", "0") for b in processors} or {"0"}
        cores = {(b.get("physical id", "0"), b.get("core id", b["processor"])) for b in processors}
    return Cpu(
        model=model,
        arch=proc.text("sys/kernel/arch") or os.uname().machine,
        sockets=len(packages),
        cores=len(cores) or threads,
        threads=threads,
        flags=flags,
    )


def collect_memory(sys: Tree, proc: Tree) -> Memory:
    total = 0
    for line in (proc.text("meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    block = sys.int("devices/system/memory/block_size_bytes", 16)
    physical = None
    if block:
        online = [
            e
            for e in sys.list("devices/system/memory")
            if e.startswith("memory") and sys.flag(f"devices/system/memory/{e}/online")
        ]
        physical = len(online) * block or None
    dimms = []
    for entry in sys.list("firmware/dmi/entries"):
        if entry.startswith("17-"):
            dimm = parse_smbios_memory_device(sys.raw(f"firmware/dmi/entries/{entry}/raw"))
            if dimm is not None:
                dimms.append(dimm)
    return Memory(total=total, physical=physical, dimms=tuple(dimms))


def parse_smbios_memory_device(raw: bytes | None) -> Dimm | None:
    """SMBIOS type 17 (Memory Device). None for an empty slot or a malformed record."""
    if raw is None or len(raw) < 0x15 or raw[0] != 17 or raw[1] > len(raw):
        return None
    length = raw[1]
    strings = raw[length:].split(b"\0")

    def string(offset: int) -> str | None:
        if offset >= length or raw[offset] == 0 or raw[offset] > len(strings):
            return None
        value = strings[raw[offset] - 1].decode("ascii", "replace").strip()
        return value or None

    (size_field,) = struct.unpack_from("<H", raw, 0x0C)
    if size_field in (0, 0xFFFF):
        return None  # no module installed, or unknown
    if size_field == 0x7FFF and length >= 0x20:
        size = (struct.unpack_from("<I", raw, 0x1C)[0] & 0x7FFFFFFF) << 20
    elif size_field & 0x8000:
        size = (size_field & 0x7FFF) << 10
    else:
        size = size_field << 20
    speed = struct.unpack_from("<H", raw, 0x15)[0] if length >= 0x17 else 0
    mem_type = raw[0x12]
    return Dimm(
        locator=string(0x10),
        size=size,
        type=_MEMORY_TYPES.get(mem_type, f"type {mem_type:#x}" if mem_type > 2 else None),
        speed_mts=speed or None,
        manufacturer=string(0x17) if length > 0x17 else None,
        serial=string(0x18) if length > 0x18 else None,
        part_number=string(0x1A) if length > 0x1A else None,
    )
