"""Extra kernel arguments an operator gives one machine's agent boot (`sledge machine set
--kernel-args`, docs/boot.md), e.g. `sledge.shell=1` for a root shell on its consoles.

They go into an iPXE script and a kernel command line, so only plain words pass: no quoting,
no `${...}` for iPXE to expand, no line break. The arguments the controller itself sets per boot
cannot be overridden: /init takes the last `sledge.token=` it sees, and a machine's own would
replace its fresh enrollment token.
"""

from __future__ import annotations

import re

WORD = r"[A-Za-z0-9_.,:=/+@%-]+"
PATTERN = rf"(?:{WORD}(?: {WORD})*)?"
EXPECTED = "kernel arguments: words of A-Z a-z 0-9 _ . , : = / + @ % - separated by single spaces"
MAX_LEN = 512  # the whole x86 command line is 2048 bytes; the controller's own part takes ~200
RESERVED = ("sledge.controller", "sledge.token", "sledge.mac", "initrd", "BOOT_IMAGE")


def reserved_key(args: str) -> str | None:
    """The first argument that names a key the controller sets on every boot, if any."""
    reserved = {r.lower() for r in RESERVED}
    for word in args.split():
        # /init upper-cases sledge.* keys into the environment: sledge.TOKEN= is sledge.token=
        if word.split("=", 1)[0].lower() in reserved:
            return word
    return None


def problem(args: str) -> str | None:
    """Why `args` may not go on an agent's kernel command line, or None when it may."""
    if len(args) > MAX_LEN:
        return f"at most {MAX_LEN} characters, got {len(args)}"
    if re.fullmatch(PATTERN, args) is None:
        return f"expected {EXPECTED}, got {args!r}"
    word = reserved_key(args)
    if word is not None:
        return f"expected arguments the controller does not set itself, got {word!r}"
    return None
