"""Section A (issue 3): import a half-sparse image; against cat, bmaptool create, casync make."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from benchlib.images import make_image
from benchlib.proc import BenchError, Timed, log, timed
from benchlib.report import Row, heading
from benchlib.sledge import import_image, tool
from benchlib.system import MB, data_bytes, disk_usage, drop_caches, human, warm_programs


@dataclass
class ImportRows:
    cat: Row
    sledge: Row
    bmaptool: Row
    casync: Row
    sledge_store: Row
    casync_store: Row


def run_import_bench(work: Path, size: int, reps: int) -> list[Row]:
    work.mkdir(parents=True, exist_ok=True)
    src = work / "halfsparse.img"
    log(f"A: building a {human(size)} half-sparse image")
    make_image(src, size, "import-halfsparse", sparse=True)
    data = data_bytes(src)
    rows = _rows(size)
    for rep in range(1, reps + 1):
        log(f"A: repetition {rep}/{reps}")
        _cat(rows.cat, src, size)
        _sledge(rows, src, size, data, work, rep)
        _bmaptool(rows.bmaptool, src, size, work)
        _casync(rows, src, size, data, work)
    src.unlink()
    return [
        heading(f"A. import: {human(size)} half-sparse image, {human(data)} of data (ratio: to cat)"),
        *vars(rows).values(),
    ]


def _rows(size: int) -> ImportRows:
    cat = Row("`cat SRC > /dev/null`")
    cat.ref = cat
    return ImportRows(
        cat=cat,
        sledge=Row("`sledge image import` (fresh store)", ref=cat),
        bmaptool=Row("`bmaptool create`", ref=cat),
        casync=Row("`casync make` (blob, fresh store)", ref=cat),
        sledge_store=Row("sledge store size / image data size"),
        casync_store=Row("casync store size / image data size"),
    )


def _timed_cold(argv: list[str], *, discard_stdout: bool = False) -> Timed:
    drop_caches()
    warm_programs([argv])
    return timed(argv, discard_stdout=discard_stdout)


def _record(row: Row, t: Timed, size: int) -> bool:
    if not t.ok:
        row.failures.append(t.error())
        return False
    row.rates.append(size / t.seconds / MB)
    return True


def _cat(row: Row, src: Path, size: int) -> None:
    _record(row, _timed_cold(["cat", str(src)], discard_stdout=True), size)


def _sledge(rows: ImportRows, src: Path, size: int, data: int, work: Path, rep: int) -> None:
    store = work / "sledge-store"
    shutil.rmtree(store, ignore_errors=True)
    drop_caches()
    warm_programs([[tool("sledge"), "image"]])
    try:
        imported = import_image(src, "bench", str(rep), store)
    except BenchError as exc:
        rows.sledge.failures.append(str(exc))
        return
    if imported.stats.get("image_size") != size or imported.stats.get("data_bytes") != data:
        rows.sledge.failures.append(f"import stats disagree with the image: {imported.stats}")
        return
    _record(rows.sledge, imported.run, size)
    used = disk_usage(store)
    rows.sledge_store.ratio_value = used / data
    rows.sledge_store.notes[:] = [f"store {human(used)} (du), data {human(data)}"]
    shutil.rmtree(store)


def _bmaptool(row: Row, src: Path, size: int, work: Path) -> None:
    bmap = work / "halfsparse.bmap"
    _record(row, _timed_cold(["bmaptool", "create", "-o", str(bmap), str(src)]), size)
    bmap.unlink(missing_ok=True)


def _casync(rows: ImportRows, src: Path, size: int, data: int, work: Path) -> None:
    store, index = work / "casync-store", work / "halfsparse.caibx"
    shutil.rmtree(store, ignore_errors=True)
    if _record(rows.casync, _timed_cold(["casync", "make", f"--store={store}", str(index), str(src)]), size):
        used = disk_usage(store)
        rows.casync_store.ratio_value = used / data
        rows.casync_store.notes[:] = [f"store {human(used)} (du), data {human(data)}; zstd, ~64 KiB chunks"]
    shutil.rmtree(store, ignore_errors=True)
    index.unlink(missing_ok=True)
