"""Section E (issue 20): `sledge-agent write` of one image to a loop device from each static web
server of scripts/webservers.py, each started from its Debian package on 127.0.0.1; MB/s and the
ratio to nginx. The same image, store and device for every server; the served files are in the
page cache (warm) unless --cold-server, as in section B."""

from __future__ import annotations

import shutil
from pathlib import Path

from webservers import SERVERS, ServerError

from benchlib.images import make_image
from benchlib.proc import BenchError, log, timed
from benchlib.report import Row, Target, heading
from benchlib.services import LoopDevice
from benchlib.sledge import chunk_files, chunk_table, import_image, write_argv
from benchlib.system import MB, MiB, discard, drop_caches, human, same_prefix, warm, warm_programs

REFERENCE = "nginx"


def run_server_bench(work: Path, size: int, reps: int, warm_server: bool) -> tuple[list[Row], list[Target]]:
    www = work / "www"  # world-readable: Apache's workers run as nobody
    www.mkdir(parents=True)
    for d in (work.parent, work, www):  # the bench work directory is private (mkdtemp)
        d.chmod(0o755)
    src = work / "random.img"
    log(f"E: building a {human(size)} random image")
    make_image(src, size, "servers-random", sparse=False)
    store = www / "store"
    digest = import_image(src, "bench-servers", "1", store).digest
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    served = [store / "manifests" / digest, *chunk_files(store, chunk_table(store, "bench-servers:1"))]
    rows: dict[str, Row] = {}
    loop_size = -(-(size + size // 4) // MiB) * MiB
    with LoopDevice(work / "loop.bin", loop_size) as loop:
        for name, (factory, tools, package) in SERVERS.items():
            row = rows[name] = Row(f"{name} ({package})")
            missing = [t for t in tools if shutil.which(t) is None]
            if missing:
                row.failures.append(f"not installed: {', '.join(missing)} (scripts/setup)")
                continue
            try:
                with factory(store, work / f"srv-{name}") as server:
                    log(f"E: {name} at {server.url}")
                    for rep in range(1, reps + 1):
                        _one_write(row, rep, server.url, digest, src, loop.device, size, served, warm_server)
            except ServerError as exc:
                row.failures.append(str(exc)[:300])
    ref = rows[REFERENCE]
    for row in rows.values():
        row.ref = ref
    title = f"E. static servers: `sledge-agent write` of {human(size)} random to a loop device"
    title += " (ratio: to nginx)"
    return [heading(title), *rows.values()], _targets(rows)


def _one_write(
    row: Row,
    rep: int,
    url: str,
    digest: str,
    src: Path,
    device: str,
    size: int,
    served: list[Path],
    warm_server: bool,
) -> None:
    argv = write_argv(f"{url}/manifests/{digest}", url, device, inplace=False)
    discard(device)
    drop_caches()
    if warm_server:
        warm(served)
    warm_programs([argv])
    t = timed(argv)
    if not t.ok:
        row.failures.append(f"rep {rep}: {t.error()}")
        return
    ok, why = same_prefix(src, device, size)
    if not ok:
        row.failures.append(f"rep {rep}: cmp: {why or 'differs'}")
        return
    row.rates.append(size / t.seconds / MB)


def _targets(rows: dict[str, Row]) -> list[Target]:
    failed = [name for name, row in rows.items() if row.failed or not row.rates]
    if REFERENCE in failed:
        raise BenchError("section E: the nginx reference run failed: " + "; ".join(rows[REFERENCE].failures))
    return [
        Target(
            "E: every static server writes the image",
            "all rows succeed",
            "all ok" if not failed else "failed: " + ", ".join(failed),
            not failed,
        )
    ]
