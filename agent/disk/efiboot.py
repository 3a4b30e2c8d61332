"""UEFI boot entries: EFI_LOAD_OPTION values (UEFI 2.10, 3.1.3) and BootOrder, as pure bytes.

A firmware boots a disk without any NVRAM entry only through the removable-media path
(\\EFI\\BOOT\\BOOTX64.EFI). An image whose ESP holds its loader elsewhere (\\EFI\\debian\\grubx64.efi
...) needs a Boot#### entry naming the partition and the file, as `efibootmgr -c` makes. sledge
adds that entry right after the entry the machine booted from (the network, which brought up the
live image), so the network stays first and the controller keeps control: its boot script answers
`exit` for a deployed machine and the firmware goes on to the disk's entry. Nothing here touches
efivarfs; agent.runtime.efivars does.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.disk.errors import DiskError
from agent.disk.fatdir import Fat, FatError
from agent.disk.tables import Tables

LOAD_OPTION_ACTIVE = 0x1
# NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS: what Boot#### and BootOrder carry.
VARIABLE_ATTRIBUTES = 0x7
GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
MAX_ENTRIES = 0x10000
MAX_PATH = 512  # characters of the loader's path: far beyond any real one, bounds the variable
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
REMOVABLE = "EFI/BOOT/BOOTX64.EFI"
# Loaders an ESP's vendor directory may hold, preferred first: shim (Secure Boot), then GRUB.
LOADERS = ("SHIMX64.EFI", "GRUBX64.EFI")


class EfiBootError(DiskError):
    """A boot entry cannot be made as asked."""


@dataclass(frozen=True)
class LoaderPath:
    """Where a loader is: a GPT partition (number, GUID, extent in LBAs) and a path on its FAT."""

    partition: int  # 1-based
    partition_guid: uuid.UUID
    start: int  # LBA
    sectors: int
    path: str  # "\\EFI\\debian\\grubx64.efi" ("/" accepted)


@dataclass(frozen=True)
class LoadOption:
    attributes: int
    description: str
    device_path: bytes  # the EFI_DEVICE_PATH list, End node included
    optional_data: bytes = b""


def efi_path(path: str) -> str:
    """A FAT path as UEFI writes it: backslashes, rooted."""
    out = "\\" + path.replace("/", "\\").lstrip("\\")
    if len(out) > MAX_PATH or "\0" in out or "\\\\" in out or out.endswith("\\"):
        raise EfiBootError(f"loader path {path!r}: expected a file path of at most {MAX_PATH} characters")
    return out


def device_path(loader: LoaderPath) -> bytes:
    """HD(partition, GPT, GUID, start, size)/File(path)/End: efibootmgr's default device path."""
    if not 1 <= loader.partition <= 0xFFFFFFFF or loader.start < 0 or loader.sectors <= 0:
        raise EfiBootError(
            f"partition {loader.partition} at LBA {loader.start}, {loader.sectors} sectors: "
            "expected a partition number from 1 and a non-empty extent"
        )
    # Media device path, hard drive: number, start, size, signature, MBR type 2 (GPT), signature
    # type 2 (GUID).
    hd = struct.pack(
        "<BBHIQQ16sBB", 4, 1, 42, loader.partition, loader.start, loader.sectors,
        loader.partition_guid.bytes_le, 2, 2,
    )  # fmt: skip
    name = (efi_path(loader.path) + "\0").encode("utf-16-le")
    file = struct.pack("<BBH", 4, 4, 4 + len(name)) + name
    end = struct.pack("<BBH", 0x7F, 0xFF, 4)
    return hd + file + end


def encode_load_option(option: LoadOption) -> bytes:
    """The EFI_LOAD_OPTION bytes: attributes, FilePathListLength, Description (UCS-2, NUL), paths, data."""
    description = (option.description + "\0").encode("utf-16-le")
    if len(option.device_path) > 0xFFFF:
        raise EfiBootError(f"device path of {len(option.device_path)} bytes: at most 65535 fit")
    head = struct.pack("<IH", option.attributes, len(option.device_path))
    return head + description + option.device_path + option.optional_data


def decode_load_option(data: bytes) -> LoadOption:
    """The inverse, for reading entries already in NVRAM (untrusted: every length is checked)."""
    if len(data) < 6:
        raise EfiBootError(f"load option of {len(data)} bytes: expected at least 6")
    attributes, path_len = struct.unpack_from("<IH", data)
    end = next((i for i in range(6, len(data) - 1, 2) if data[i : i + 2] == b"\0\0"), None)
    if end is None:
        raise EfiBootError("load option: its description has no terminating NUL")
    try:
        description = data[6:end].decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise EfiBootError(f"load option: description is not UTF-16: {exc}") from None
    paths = end + 2
    if paths + path_len > len(data):
        raise EfiBootError(f"load option: FilePathListLength {path_len} runs past its {len(data)} bytes")
    return LoadOption(attributes, description, data[paths : paths + path_len], data[paths + path_len :])


def decode_boot_order(data: bytes) -> list[int]:
    if len(data) % 2:
        raise EfiBootError(f"BootOrder of {len(data)} bytes: expected an even length")
    return [n for (n,) in struct.iter_unpack("<H", data)]


def encode_boot_order(order: Sequence[int]) -> bytes:
    return b"".join(struct.pack("<H", n) for n in order)


@dataclass(frozen=True)
class EntryPlan:
    number: int  # the Boot#### to write
    option: bytes  # its EFI_LOAD_OPTION
    order: tuple[int, ...]  # the new BootOrder
    reused: bool  # an entry with the same device path existed (redeploys do not pile up entries)

    @property
    def name(self) -> str:
        return f"Boot{self.number:04X}"


def plan_entry(
    loader: LoaderPath,
    description: str,
    entries: Mapping[int, bytes],
    order: Sequence[int],
    current: int | None,
) -> EntryPlan:
    """The Boot#### to write and the new BootOrder: the entry goes right after BootCurrent (the
    network entry the live image came through) or, when that is not in BootOrder, after the first
    entry; an existing entry for the same partition and file is reused, else the lowest free number.
    entries: the Boot#### values present (number -> EFI_LOAD_OPTION)."""
    path = device_path(loader)
    option = encode_load_option(LoadOption(LOAD_OPTION_ACTIVE, description, path))
    same = sorted(n for n, raw in entries.items() if _device_path_of(raw) == path)
    if same:
        number, reused = same[0], True
    else:
        number = next((n for n in range(MAX_ENTRIES) if n not in entries), -1)
        reused = False
        if number < 0:
            raise EfiBootError(f"all {MAX_ENTRIES} Boot#### variables are in use")
    rest = [n for n in dict.fromkeys(order) if n != number]
    anchor = current if current is not None and current in rest else (rest[0] if rest else None)
    at = rest.index(anchor) + 1 if anchor is not None else 0
    return EntryPlan(number, option, (*rest[:at], number, *rest[at:]), reused)


def _device_path_of(raw: bytes) -> bytes | None:
    try:
        return decode_load_option(raw).device_path
    except EfiBootError:
        return None  # a damaged entry is never "ours"; it is left as it is


@dataclass(frozen=True)
class EspVerdict:
    """What a deployed disk needs from NVRAM: nothing (no ESP, or the removable path is there),
    or an entry for `loader`; `detail` says which, for the job's report."""

    loader: LoaderPath | None
    detail: str


def esp_verdict(tables: Tables, read: Callable[[int, int], bytes]) -> EspVerdict:
    """Look at the disk's ESPs (GPT type C12A7328-...): the first holding the removable-media
    loader needs no entry; otherwise the first vendor loader (EFI/<dir>/shimx64.efi or
    grubx64.efi) found gets one. read: (byte offset, length) on the disk."""
    copy = tables.primary
    if copy is None or not copy.valid:
        return EspVerdict(None, "no valid GPT: no EFI system partition")
    esps = [e for e in copy.used if e.type_guid == ESP_TYPE.bytes_le]
    if not esps:
        return EspVerdict(None, "no EFI system partition")
    sector = tables.sector
    found: list[LoaderPath] = []
    problems: list[str] = []
    for e in esps:
        start, size = e.first * sector, (e.last + 1 - e.first) * sector

        def part(offset: int, length: int, start: int = start) -> bytes:
            return read(start + offset, length)

        try:
            fat = Fat.open(part, size)
            if fat.exists(REMOVABLE):
                return EspVerdict(
                    None, f"partition {e.slot + 1} holds the removable-media loader {REMOVABLE}"
                )
            for vendor in sorted(d.name for d in fat.listdir("EFI") if d.directory and d.name != "BOOT"):
                names = {f.name for f in fat.listdir(f"EFI/{vendor}") if not f.directory}
                for loader in LOADERS:
                    if loader in names:
                        found.append(
                            LoaderPath(
                                e.slot + 1,
                                uuid.UUID(bytes_le=e.guid),
                                e.first,
                                e.last + 1 - e.first,
                                f"EFI/{vendor}/{loader}",
                            )
                        )
                        break
        except FatError as exc:
            problems.append(f"partition {e.slot + 1}: {exc}")
    if found:
        return EspVerdict(found[0], f"partition {found[0].partition} has no removable-media loader")
    why = "; ".join(problems) if problems else "no EFI/<vendor>/shimx64.efi or grubx64.efi"
    return EspVerdict(None, f"no loader found on the EFI system partition ({why})")
