"""The sledge commands the benchmark times, and what it reads back from them."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.proc import BenchError, Timed, run, timed

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """.venv/bin/NAME of this checkout, else the one beside this Python, else PATH."""
    for candidate in (REPO / ".venv" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found: run scripts/setup")
    return found


@dataclass
class Imported:
    digest: str
    stats: dict[str, Any]
    run: Timed


def import_image(src: Path, name: str, version: str, store: Path) -> Imported:
    """`sledge image import SRC --name N --version V --store DIR --json`: stats line, then digest."""
    argv = [tool("sledge"), "image", "import", str(src), "--name", name, "--version", version]
    t = timed([*argv, "--store", str(store), "--json"])
    if not t.ok:
        raise BenchError(f"sledge image import {src}: {t.error()}")
    lines = t.stdout.strip().splitlines()
    digest = lines[-1].strip()
    if len(digest) != 64 or len(lines) < 2:
        raise BenchError(f"sledge image import: unexpected output {t.stdout[-300:]!r}")
    return Imported(digest, json.loads(lines[-2]), t)


def chunk_table(store: Path, ref: str) -> list[dict[str, Any]]:
    """`sledge image show REF --json --chunks`: one dict per chunk (digest, kind, stored_len...)."""
    shown = json.loads(
        run([tool("sledge"), "image", "show", ref, "--json", "--chunks", "--store", str(store)])
    )
    table: list[dict[str, Any]] = shown["chunk_table"]
    return table


def changed_stored_bytes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> int:
    """Stored bytes of the chunks `new` has and `old` has not: what an update must download."""
    old_digests = {c["digest"] for c in old}
    fresh = {
        c["digest"]: c["stored_len"] for c in new if c["kind"] == "data" and c["digest"] not in old_digests
    }
    return sum(fresh.values())


def chunk_files(store: Path, table: list[dict[str, Any]]) -> list[Path]:
    digests = sorted({c["digest"] for c in table if c["kind"] == "data"})
    return [store / "chunks" / d[:2] / d for d in digests]


def write_argv(
    manifest_url: str, source_url: str, device: str, *, inplace: bool, before: tuple[str, ...] = ()
) -> list[str]:
    """`sledge-agent write`; `before`: sources listed ahead of `source_url` (a dead mirror, say)."""
    argv = [tool("sledge-agent"), "write", "--manifest", manifest_url]
    for url in (*before, source_url):
        argv += ["--source", url]
    argv += ["--device", device, "--json"]
    return argv if inplace else [*argv, "--no-inplace"]


def write_report(t: Timed) -> dict[str, Any]:
    """The JSON report `sledge-agent write --json` prints as its last line."""
    lines = t.stdout.strip().splitlines()
    if not lines:
        raise ValueError("no report on stdout")
    report: dict[str, Any] = json.loads(lines[-1])
    return report
