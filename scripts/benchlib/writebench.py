"""Section B (issue 4): write images to a loop device from nginx on 127.0.0.1, against the peers."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib.images import make_image, make_v2
from benchlib.proc import Timed, log, run, timed, timed_pipeline
from benchlib.report import Row, Target, heading, median
from benchlib.services import LoopDevice, Nginx, StalledServer
from benchlib.sledge import (
    changed_stored_bytes,
    chunk_files,
    chunk_table,
    import_image,
    write_argv,
    write_report,
)
from benchlib.system import (
    MB,
    MiB,
    discard,
    drop_caches,
    files_under,
    human,
    same_prefix,
    warm,
    warm_programs,
)

CHUNK = 4 * MiB  # sledge's default chunk size
V2_FRACTION = 0.05


@dataclass
class Image:
    """One test image, its sledge manifest, bmap and casync index, and where nginx serves them."""

    key: str  # file stem and URL path
    title: str
    path: Path
    digest: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bmap(self) -> Path:
        return self.path.with_suffix(".bmap")

    @property
    def caibx(self) -> Path:
        return self.path.with_suffix(".caibx")


@dataclass(eq=False)
class ImageRows:
    sledge: Row
    curl_dd: Row
    bmaptool: Row
    casync: Row
    casync_seed: Row
    sledge_same: Row


class WriteBench:
    def __init__(self, work: Path, size: int, reps: int, warm_server: bool) -> None:
        self.work = work
        self.www = work / "www"  # nginx's root: img/, store/, castore/<key>/
        self.store = self.www / "store"
        self.size = size
        self.reps = reps
        self.warm_server = warm_server
        self.rep = 0
        img = self.www / "img"
        self.random = Image("random", "fully random", img / "random.img")
        self.sparse = Image("halfsparse", "half-sparse", img / "halfsparse.img")
        self.v2 = Image("halfsparse-v2", "half-sparse v2", img / "halfsparse-v2.img")
        self.changed_bytes = 0
        self.back_bytes = 0  # v1's stored bytes of the chunks v2 changed: what a rollback must move
        self.v2_chunks = 0
        self.rss: list[int] = []
        self.line = Row("line rate = min(curl, fio), per repetition")
        self.line.ref = self.line
        self.curl = Row("  curl of the raw image -> /dev/null (nginx, 127.0.0.1)", ref=self.line)
        self.fio = Row("  fio 4 MiB O_DIRECT writes, iodepth 8 (loop device)", ref=self.line)
        self.fio_read = Row("fio 4 MiB O_DIRECT reads, iodepth 8 (not in line rate: bounds in-place checks)")
        self.fio_read.ref = self.line
        self.rows = {img.key: self._image_rows(img) for img in (self.random, self.sparse)}
        self.v2_row = Row("half-sparse: sledge v1 -> v2 (in place on)", ref=self.line)
        self.dead_row = Row(
            "fully random: sledge fresh, a dead first `--source` (accepts, never answers) + nginx "
            "(ratio: to nginx alone)",
            ref=self.rows["random"].sledge,
        )
        self.dead: StalledServer | None = None
        self.back_row = Row("half-sparse: sledge v2 -> v1, the rollback (in place on)", ref=self.line)
        self.reports: dict[str, list[dict[str, Any]]] = {}  # row label -> sledge reports
        self.wall: dict[str, list[float]] = {}  # row label -> wall-clock MB/s, where the row uses another
        self.web: Nginx | None = None
        self.device = ""

    def _image_rows(self, img: Image) -> ImageRows:
        def row(text: str) -> Row:
            return Row(f"{img.title}: {text}", ref=self.line)

        return ImageRows(
            sledge=row("sledge fresh (`--no-inplace`)"),
            curl_dd=row("`curl | dd oflag=direct`"),
            bmaptool=row("`bmaptool copy` with its bmap"),
            casync=row("`casync extract` fresh (`--seed-output=no`)"),
            casync_seed=row("`casync extract --seed=DEV --seed-output=no`, disk holds the image"),
            sledge_same=row("sledge, same image onto the disk holding it"),
        )

    # ---- preparation -------------------------------------------------------------------------

    def prepare(self) -> None:
        self.random.path.parent.mkdir(parents=True)
        log(f"B: building images ({human(self.size)} random, half-sparse, v2 with {V2_FRACTION:.0%} changed)")
        make_image(self.random.path, self.size, "write-random", sparse=False)
        make_image(self.sparse.path, self.size, "write-halfsparse", sparse=True)
        changed = make_v2(self.sparse.path, self.v2.path, CHUNK, V2_FRACTION, "write-halfsparse")
        self.v2_chunks = len(changed)
        for img, version in ((self.random, "1"), (self.sparse, "1"), (self.v2, "2")):
            name = "bench-random" if img is self.random else "bench-halfsparse"
            log(f"B: sledge image import {img.path.name}")
            img.digest = import_image(img.path, name, version, self.store).digest
            img.table = chunk_table(self.store, f"{name}:{version}")
        self.changed_bytes = changed_stored_bytes(self.sparse.table, self.v2.table)
        self.back_bytes = changed_stored_bytes(self.v2.table, self.sparse.table)
        for img in (self.random, self.sparse):
            log(f"B: bmaptool create, casync make {img.path.name}")
            self.castore(img).parent.mkdir(exist_ok=True)
            run(["bmaptool", "create", "-o", str(img.bmap), str(img.path)])
            run(["casync", "make", f"--store={self.castore(img)}", str(img.caibx), str(img.path)])

    def castore(self, img: Image) -> Path:
        return self.www / "castore" / img.key

    # ---- URLs and what a contender reads from the server ------------------------------------

    def url(self, path: Path) -> str:
        assert self.web is not None
        return f"{self.web.base}/{path.relative_to(self.www)}"

    def manifest_url(self, img: Image) -> str:
        return self.url(self.store / "manifests" / img.digest)

    def warm_for(self, *paths: Path) -> None:
        if self.warm_server:
            warm(paths)

    # ---- measurements ------------------------------------------------------------------------

    def run_all(self, web: Nginx, device: str) -> None:
        self.web, self.device = web, device
        for rep in range(1, self.reps + 1):
            self.rep = rep
            log(f"B: repetition {self.rep}/{self.reps}")
            self.line_rate()
            for img in (self.random, self.sparse):
                self.fresh_writes(img)
                self.writes_onto_image(img)
            self.v1_to_v2()
            self.dead_mirror()

    def dead_mirror(self) -> None:
        """Issue 15: the fresh random write with a dead mirror listed first; source health should
        keep it near the healthy write (before it, each chunk waited out the stall timeout)."""
        assert self.dead is not None
        self.sledge_write(self.dead_row, self.random, inplace=False, fresh=True, before=(self.dead.base,))

    def line_rate(self) -> None:
        """fio's and curl's own throughput figures (fio alone spends ~0.4 s starting and stopping)."""
        fio_rate = self._fio()
        curl_rate = self._curl()
        if fio_rate and curl_rate:
            self.line.rates.append(min(fio_rate, curl_rate))
            self.line.notes[:] = ["bounded by " + ", ".join(self._line_bounds())]

    def _fio(self) -> float | None:
        """Sequential 4 MiB O_DIRECT writes onto the fresh (discarded) device, then reads of them back."""
        discard(self.device)
        rate = self._fio_run(self.fio, "write")
        if rate is not None:
            self._fio_run(self.fio_read, "read")
        return rate

    def _fio_run(self, row: Row, mode: str) -> float | None:
        drop_caches()
        argv = ["fio", "--name=w", f"--filename={self.device}", f"--rw={mode}", "--bs=4M", "--direct=1"]
        argv += ["--ioengine=libaio", "--iodepth=8", f"--size={self.size}", "--output-format=json"]
        t = timed(argv)
        if not t.ok:
            row.failures.append(f"rep {self.rep}: {t.error()}")
            return None
        job = json.loads(t.stdout[t.stdout.index("{") :])["jobs"][0][mode]
        if job["io_bytes"] != self.size:
            row.failures.append(f"rep {self.rep}: fio moved {job['io_bytes']} bytes")
            return None
        return self._own_rate(row, job["bw_bytes"], t)

    def _curl(self) -> float | None:
        drop_caches()
        self.warm_for(self.random.path)
        argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}"]
        t = timed([*argv, self.url(self.random.path)])
        if not t.ok:
            self.curl.failures.append(f"rep {self.rep}: {t.error()}")
            return None
        size, speed = t.stdout.split()
        if int(size) != self.size:
            self.curl.failures.append(f"rep {self.rep}: curl got {size} bytes")
            return None
        return self._own_rate(self.curl, float(speed), t)

    def _own_rate(self, row: Row, bytes_per_second: float, t: Timed) -> float:
        rate = bytes_per_second / MB
        row.rates.append(rate)
        self.wall.setdefault(row.label, []).append(self.size / t.seconds / MB)
        row.notes[:] = [f"the tool's own figure; by wall clock {median(self.wall[row.label]):.0f} MB/s"]
        return rate

    def _line_bounds(self) -> list[str]:
        bounds = ["fio" if f < c else "curl" for f, c in zip(self.fio.rates, self.curl.rates, strict=True)]
        return [f"{b} x{bounds.count(b)}" for b in sorted(set(bounds))]

    def fresh_writes(self, img: Image) -> None:
        rows = self.rows[img.key]
        raw = self.url(img.path)
        self.sledge_write(rows.sledge, img, inplace=False, fresh=True)
        dd = ["dd", f"of={self.device}", "bs=4M", "oflag=direct", "iflag=fullblock", "status=none"]
        self.contender(rows.curl_dd, img, [["curl", "-sS", "--fail", raw], dd], [img.path])
        bmap = ["bmaptool", "-q", "copy", "--bmap", str(img.bmap), raw, self.device]
        self.contender(rows.bmaptool, img, [bmap], [img.path])
        casync = ["casync", "extract", f"--store={self.url(self.castore(img))}/", "--seed-output=no"]
        self.contender(rows.casync, img, [[*casync, str(img.caibx), self.device]], self.casync_files(img))

    def writes_onto_image(self, img: Image) -> None:
        """The disk holds `img` now (the last fresh write was verified)."""
        rows = self.rows[img.key]
        # --seed-output=no: the device is already the explicit seed (indexing it twice halves the speed).
        casync = ["casync", "extract", f"--store={self.url(self.castore(img))}/", f"--seed={self.device}"]
        casync.append("--seed-output=no")
        self.contender(
            rows.casync_seed,
            img,
            [[*casync, str(img.caibx), self.device]],
            self.casync_files(img),
            fresh=False,
        )
        self.sledge_write(rows.sledge_same, img, inplace=True, fresh=False)

    def v1_to_v2(self) -> None:
        """The disk holds half-sparse v1 (the same-image write was verified); write v2 over it, then roll
        back to v1."""
        self.sledge_write(self.v2_row, self.v2, inplace=True, fresh=False)
        self.sledge_write(self.back_row, self.sparse, inplace=True, fresh=False)

    def casync_files(self, img: Image) -> list[Path]:
        return [img.caibx, *files_under(self.castore(img))]

    # ---- one timed write ---------------------------------------------------------------------

    def contender(
        self,
        row: Row,
        img: Image,
        stages: Sequence[Sequence[str]],
        served: Sequence[Path],
        *,
        fresh: bool = True,
    ) -> Timed | None:
        """Discard the device (a fresh disk) unless told not to, drop the caches, warm what the server
        will send and the contender's programs, time the command, and verify the device with cmp
        before counting the run."""
        if fresh:
            discard(self.device)
        drop_caches()
        self.warm_for(*served)
        warm_programs(stages)
        t = timed_pipeline(stages)
        if self._rate(row, t, verify=img) is None:
            return None
        return t

    def sledge_write(
        self, row: Row, img: Image, *, inplace: bool, fresh: bool, before: tuple[str, ...] = ()
    ) -> None:
        store = self.url(self.store)
        argv = write_argv(self.manifest_url(img), store, self.device, inplace=inplace, before=before)
        served = [self.store / "manifests" / img.digest, *chunk_files(self.store, img.table)]
        t = self.contender(row, img, [argv], served, fresh=fresh)
        if t is None:
            return
        self.rss.append(t.maxrss)
        try:
            report = write_report(t)
        except ValueError as exc:
            row.failures.append(f"rep {self.rep}: report: {exc}")
            return
        self.reports.setdefault(row.label, []).append(report)

    def _rate(self, row: Row, t: Timed, *, verify: Image | None = None) -> float | None:
        """Record image bytes per wall-clock second, or a failure (command error, cmp mismatch)."""
        if not t.ok:
            row.failures.append(f"rep {self.rep}: {t.error()}")
            return None
        if verify is not None:
            ok, why = same_prefix(verify.path, self.device, self.size)
            if not ok:
                row.failures.append(f"rep {self.rep}: cmp: {why or 'differs'}")
                return None
        rate = self.size / t.seconds / MB
        row.rates.append(rate)
        return rate

    # ---- results -----------------------------------------------------------------------------

    def table_rows(self) -> list[Row]:
        self._annotate_sledge_rows()
        rss = Row("sledge peak RSS (all sledge writes)")
        if self.rss:
            rss.notes = [f"median {statistics.median(self.rss) / MB:.0f} MB, max {max(self.rss) / MB:.0f} MB"]
        out = [heading(f"B. write: {human(self.size)} images to a loop device (ratio: to line rate)")]
        out += [self.line, self.curl, self.fio, self.fio_read]
        for rows in self.rows.values():
            out += [rows.sledge, rows.curl_dd, rows.bmaptool, rows.casync, rows.casync_seed, rows.sledge_same]
        return [*out, self.v2_row, self.back_row, self.dead_row, rss]

    def _annotate_sledge_rows(self) -> None:
        for rows in self.rows.values():
            for row in (rows.sledge, rows.sledge_same):
                row.notes = self._sledge_notes(row)
        for row, changed in ((self.v2_row, self.changed_bytes), (self.back_row, self.back_bytes)):
            row.notes = self._sledge_notes(row)[1:]
            downloaded = self._downloaded(row)
            if downloaded is not None and changed:
                row.notes.insert(
                    0,
                    f"downloaded {human(downloaded)} vs changed chunks' stored bytes {human(changed)} "
                    f"({self.v2_chunks} chunks): {downloaded / changed:.2f}x",
                )
        self.dead_row.notes = self._dead_notes()

    def _sledge_notes(self, row: Row) -> list[str]:
        """From the median run's JSON report: its own rate, what it did, where its threads were busy."""
        reports = self.reports.get(row.label, [])
        if not reports:
            return []
        mid = sorted(reports, key=lambda r: r["seconds"])[len(reports) // 2]
        busy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(mid["busy"].items(), key=lambda kv: -kv[1]))
        own = self.size / mid["seconds"] / MB
        return [
            f"downloaded {human(median([r['fetched_bytes'] for r in reports]))}",
            f"own timer {own:.0f} MB/s ({own / self.line.rate:.2f}x)",
            "chunks {chunks_fetched} fetched / {chunks_inplace} in place / {chunks_zero} zero".format(**mid),
            f"busy thread-s: {busy}",
        ]

    def _dead_notes(self) -> list[str]:
        """How many requests the dead source took (the agent's events; each waited out a stall)."""
        reports = self.reports.get(self.dead_row.label, [])
        if not reports or self.dead is None:
            return []
        by_source = reports[-1].get("bytes_by_source", {})
        return [
            f"requests to the dead source: {self.dead.connections} over {len(reports)} runs",
            "bytes by source (last run): " + ", ".join(f"{k} {human(v)}" for k, v in by_source.items()),
            "source health cuts its tries (the first at 2 s, then 0.5 s) instead of the 10 s stall timeout",
        ]

    def _downloaded(self, row: Row, worst: bool = False) -> float | None:
        """Median (or largest) bytes downloaded over the row's runs."""
        fetched = [r["fetched_bytes"] for r in self.reports.get(row.label, [])]
        if not fetched:
            return None
        return max(fetched) if worst else median(fetched)

    def _read_bound(self, img: Image, row: Row) -> str:
        data = sum(c["length"] for c in img.table if c["kind"] == "data")
        usable = row.rates and self.fio_read.rates and self.line.rates
        if not usable:
            return ""
        return _read_bound_text(self.size, data, self.fio_read.rate, self.line.rate, row.rate)

    def targets(self) -> list[Target]:
        rnd, hs = self.rows["random"], self.rows["halfsparse"]

        def ratio(row: Row, ref: Row) -> float:
            usable = row.rates and ref.rates and not row.failed and not ref.failed
            return row.rate / ref.rate if usable else float("nan")

        out = [
            _at_least("fully random: sledge fresh vs line rate", ratio(rnd.sledge, self.line), 0.85),
            _at_least("fully random: sledge fresh vs `curl | dd`", ratio(rnd.sledge, rnd.curl_dd), 3.0),
            _at_least("fully random: sledge fresh vs `bmaptool copy`", ratio(rnd.sledge, rnd.bmaptool), 3.0),
            _at_least(
                "half-sparse: sledge fresh vs line rate (image bytes/s)", ratio(hs.sledge, self.line), 1.6
            ),
        ]
        for img, rows in ((self.random, rnd), (self.sparse, hs)):
            got = ratio(rows.sledge_same, self.line)
            fetched = self._downloaded(rows.sledge_same, worst=True)
            ok = got >= 2.0 and fetched == 0
            what = rows.sledge_same.label.replace("sledge, ", "")
            measured = f"{got:.2f}x, downloaded at most {human(fetched) if fetched is not None else '?'}"
            measured += self._read_bound(img, rows.sledge_same)
            out.append(Target(what, ">= 2x line rate, 0 B downloaded", measured, ok))
        for what, row, changed in (
            ("v1 -> v2", self.v2_row, self.changed_bytes),
            ("v2 -> v1 (rollback)", self.back_row, self.back_bytes),
        ):
            downloaded = self._downloaded(row)
            moved = downloaded / changed if downloaded is not None and changed else float("nan")
            label = f"{what}: downloaded / changed chunks' stored bytes"
            out.append(Target(label, "<= 1.1x", f"{moved:.2f}x", moved <= 1.1))
        peak = statistics.median(self.rss) / MB if self.rss else float("nan")
        out.append(
            Target(
                "sledge peak RSS (4 MiB chunks)",
                "<= 150 MB",
                f"{peak:.0f} MB (max {max(self.rss, default=0) / MB:.0f})",
                peak <= 150,
            )
        )
        return out


def _read_bound_text(size: int, data: int, fio_read: float, line: float, sledge: float) -> str:
    """What the device's read rate allows a writer that hashes every data byte in place: the data
    read at fio's read rate (zero ranges are zeroed alongside, not read), in image bytes/s."""
    if not (data and fio_read and line and sledge):
        return ""
    bound = fio_read * size / data
    return (
        f"; the device reads at {fio_read / line:.2f}x line rate (fio), so reading the "
        f"{human(data)} of data bounds this row at {bound / line:.2f}x; "
        f"sledge: {sledge / bound:.2f}x of that bound"
    )


def _at_least(label: str, got: float, need: float) -> Target:
    return Target(label, f">= {need:g}x", f"{got:.2f}x", got >= need)


def run_write_bench(work: Path, size: int, reps: int, warm_server: bool) -> tuple[list[Row], list[Target]]:
    bench = WriteBench(work, size, reps, warm_server)
    bench.prepare()
    loop_size = -(-(size + size // 4) // MiB) * MiB
    with (
        Nginx(bench.www, work / "nginx") as web,
        LoopDevice(work / "loop.bin", loop_size) as loop,
        StalledServer() as bench.dead,
    ):
        bench.run_all(web, loop.device)
    return bench.table_rows(), bench.targets()
