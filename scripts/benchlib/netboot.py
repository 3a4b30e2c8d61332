"""Power-on to agent registered through DHCP + TFTP + iPXE: where the time goes, from the console.

A boot's console lines are stamped as they arrive (seconds after QEMU started); `phases()` cuts
that timeline at the first line of each mark, in order. Pure: the QEMU side is in bootbench.py.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The kernel's own clock: /init's first line carries the uptime ("sledge-init: [5.15] sledge live
# image"), so the moment the kernel started is that line's time less its uptime; a line of that
# moment is put in the timeline, which splits the time from the initramfs's download to /init in
# the part before the kernel runs (iPXE's hand-over, the XZ decompressor of Debian's bzImage) and
# the kernel's start.
INIT_FIRST = r"sledge-init: .*sledge live image"
KERNEL_ZERO = r"^kernel: its clock's zero$"
_UPTIME = re.compile(r"sledge-init: \[(\d+(?:\.\d+)?)\] sledge live image")

# (phase name, the console line that ends it). A mark that never shows (BIOS has no firmware PXE,
# a console that lost a line) gives its phase 0 s and leaves the time to the next one.
MARKS: tuple[tuple[str, str], ...] = (
    ("firmware (power-on to its PXE)", r">>Start PXE|iPXE initialising"),
    ("firmware PXE: DHCP + TFTP of iPXE", r"iPXE initialising"),
    ("iPXE: banner wait + DHCP", r"Configuring \(net0 .*ok"),
    ("HTTP: script, kernel, initramfs", r"initrd\.img\.\.\..*ok"),
    ("iPXE hands over, the bzImage decompresses itself (XZ)", KERNEL_ZERO),
    ("kernel: its start, initramfs unpacked, to /init", INIT_FIRST),
    ("live image: udev until the NICs are named", r"sledge-init: .*udev: (NIC .* named|devices settled)"),
    ("live image: DHCP", r"sledge-init: .*network: "),
    (
        "agent: the rest of its start-up, devices settled, inventory, register",
        r"sledge-agent: registered as machine",
    ),
)
REGISTERED = MARKS[-1][1]

# Spans beside the phases: the agent starts beside udev and DHCP (from the line before it starts to
# its first line), so its Python start-up overlaps them and is not one of the phases.
SPANS: tuple[tuple[str, str, str], ...] = (
    (
        "agent: Python start-up (beside udev and DHCP)",
        r"sledge-init: .*starting sledge-agent",
        r"sledge-agent: controller ",
    ),
)


@dataclass(frozen=True)
class Boot:
    total: float  # power-on to registered, s
    phases: tuple[tuple[str, float], ...]  # in MARKS order; they add up to total
    spans: tuple[tuple[str, float], ...] = ()  # in SPANS order; 0 s where a line is missing


def phases(stamps: Sequence[tuple[float, str]], total: float) -> Boot:
    """Cut the (seconds, line) timeline at each mark; a mark missing (or out of order) takes 0 s."""
    stamps = with_kernel_zero(stamps)
    out: list[tuple[str, float]] = []
    last = 0.0
    for name, pattern in MARKS:
        regex = re.compile(pattern)
        at = next((t for t, line in stamps if t >= last and regex.search(line)), last)
        out.append((name, at - last))
        last = at
    return Boot(total, tuple(out), tuple((name, span(stamps, a, b)) for name, a, b in SPANS))


def span(stamps: Sequence[tuple[float, str]], start: str, end: str) -> float:
    """From the first line matching `start` to the first after it matching `end` (0 s if either
    is missing)."""
    first = next((t for t, line in stamps if re.search(start, line)), None)
    if first is None:
        return 0.0
    last = next((t for t, line in stamps if t >= first and re.search(end, line)), None)
    return 0.0 if last is None else last - first


def with_kernel_zero(stamps: Sequence[tuple[float, str]]) -> list[tuple[float, str]]:
    """The timeline with a line at the kernel's start, from /init's first line and its uptime (none
    if that line is missing or its uptime would put the start before the previous line)."""
    out = list(stamps)
    for i, (t, line) in enumerate(out):
        m = _UPTIME.search(line)
        if m is None:
            continue
        zero = t - float(m[1])
        if zero >= (out[i - 1][0] if i else 0.0):
            out.insert(i, (zero, "kernel: its clock's zero"))
        break
    return out


def median_phases(boots: Sequence[Boot]) -> list[tuple[str, float]]:
    """Each phase's median over the boots (medians do not add up to the median total), then each
    span's."""
    out = [(name, statistics.median(b.phases[i][1] for b in boots)) for i, (name, _) in enumerate(MARKS)]
    return out + [
        (name, statistics.median(b.spans[i][1] if len(b.spans) > i else 0.0 for b in boots))
        for i, (name, _, _) in enumerate(SPANS)
    ]


def tftp_sent(log: str) -> list[str]:
    """The files dnsmasq's TFTP server sent, from its log lines ("sent /dir/tftp/NAME to ADDR")."""
    return [m[1] for m in re.finditer(r"sent \S+/tftp/(\S+) to ", log)]
