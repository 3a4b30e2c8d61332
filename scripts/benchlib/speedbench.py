"""Section F (issue 13 item 5): a compressible image at the limit, and CPU-seconds per GiB written.

The image (any raw or qcow2 file, --compressible-image; by default one built from this machine's
/usr files, which compress like an OS image's) is imported with zstd and written to a loop device
from nginx on 127.0.0.1. Rates are image bytes per wall-clock second, against the line rate
(min(fio, curl)) and against `zstd -d` decompressing the very chunk files sledge fetches. CPU is
user + system seconds from rusage of each command's processes (wait4: a pipeline's stages and the
children they waited for), per GiB of image written, for sledge, `bmaptool copy` of the image
compressed with zstd and its bmap, `curl | zstd -d | dd oflag=direct`, and the parts a writer
cannot avoid: receiving (curl to /dev/null), writing (fio), hashing (blake3), decompressing (zstd -d).
A fully random image of the same size gives the same CPU figures where nothing compresses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.images import make_image
from benchlib.proc import BenchError, Timed, log, run, timed, timed_pipeline
from benchlib.report import Row, Target, heading, median
from benchlib.services import LoopDevice, Nginx
from benchlib.sledge import chunk_files, chunk_table, tool, write_argv, write_report
from benchlib.system import MB, GiB, MiB, discard, drop_caches, human, warm, warm_programs
from benchlib.written import check_written

CORPUS = [Path("/usr/lib"), Path("/usr/share"), Path("/usr/bin")]
HASH = (
    "import blake3, mmap, sys\n"
    "size, block = int(sys.argv[1]), 4 << 20\n"
    "buf = mmap.mmap(-1, block)\n"
    "buf.write(bytes(range(256)) * (block // 256))\n"
    "for _ in range(size // block):\n"
    "    blake3.blake3(buf).digest()\n"
)


def make_compressible(path: Path, size: int) -> None:
    """`size` bytes of this machine's programs, libraries and text, in a fixed order (what an OS
    image holds; zstd -3 stores it at roughly a third)."""
    done = 0
    with open(path, "wb") as out:
        for _ in range(8):  # a small /usr is read again (at other offsets: other chunks)
            for file in _corpus():
                try:
                    data = file.read_bytes()[: size - done]
                except OSError:
                    continue
                out.write(data)
                done += len(data)
                if done >= size:
                    return
    raise BenchError(f"only {human(done)} of files under {', '.join(map(str, CORPUS))}; need {human(size)}")


def _corpus() -> list[Path]:
    files = []
    for root in CORPUS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files += [Path(dirpath) / n for n in sorted(filenames)]
    return [f for f in files if not f.is_symlink() and f.is_file()]


@dataclass
class Cpu:
    """CPU seconds per GiB written, per repetition, for one command."""

    label: str
    values: list[float] = field(default_factory=list)

    def add(self, t: Timed, size: int) -> None:
        self.values.append(t.cpu * GiB / size)

    @property
    def value(self) -> float:
        return median(self.values)


@dataclass
class Stored:
    """One import of the image: its level, store directory, chunk files and their sizes."""

    level: int
    store: Path
    digest: str = ""
    files: list[Path] = field(default_factory=list)
    stored: int = 0  # bytes of the chunk files
    data: int = 0  # raw bytes of the data chunks
    zstd_files: list[Path] = field(default_factory=list)  # the chunks stored compressed
    zstd_data: int = 0  # raw bytes those decompress to
    seconds: float = 0.0  # the import's wall clock


class SpeedBench:
    def __init__(self, work: Path, size: int, reps: int, image: Path | None, levels: list[int]) -> None:
        self.work, self.size, self.reps, self.levels = work, size, reps, levels
        self.www = work / "www"
        self.given = image
        self.raw = self.www / "os.img"
        self.zst = self.www / "os.img.zst"
        self.random = self.www / "random.img"
        self.stores: dict[int, Stored] = {}
        self.random_store = Stored(3, self.www / "store-random")
        self.line = Row("line rate = min(curl, fio), per repetition")
        self.line.ref = self.line
        self.rows: dict[str, Row] = {}
        self.cpu: dict[str, Cpu] = {}
        self.web: Nginx | None = None
        self.device = ""
        self.rep = 0

    def row(self, key: str, label: str) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(label, ref=self.line)
        return self.rows[key]

    def cpu_of(self, key: str, label: str) -> Cpu:
        return self.cpu.setdefault(key, Cpu(label))

    # ---- preparation -------------------------------------------------------------------------

    def prepare(self) -> None:
        self.www.mkdir(parents=True)
        if self.given is not None:
            log(f"F: converting {self.given} to raw")
            run(["qemu-img", "convert", "-O", "raw", str(self.given), str(self.raw)])
            self.size = self.raw.stat().st_size
            if self.size % (4 * MiB):
                with open(self.raw, "r+b") as f:  # whole chunks, for fio and the peers alike
                    f.truncate(-(-self.size // (4 * MiB)) * 4 * MiB)
                self.size = self.raw.stat().st_size
        else:
            log(f"F: building a {human(self.size)} compressible image from /usr files")
            make_compressible(self.raw, self.size)
        make_image(self.random, self.size, "speed-random", sparse=False)
        for level in self.levels:
            self.stores[level] = self._import(
                self.raw, "bench-os", Stored(level, self.www / f"store-{level}")
            )
        self._import(self.random, "bench-random", self.random_store)
        log("F: zstd -T0 -3 and bmaptool create for the peers")
        run(["zstd", "-q", "-T0", "-3", "-f", str(self.raw), "-o", str(self.zst)])
        run(["bmaptool", "create", "-o", str(self.raw.with_suffix(".bmap")), str(self.raw)])

    def _import(self, src: Path, name: str, st: Stored) -> Stored:
        log(f"F: sledge image import {src.name} at zstd level {st.level}")
        argv = [tool("sledge"), "image", "import", str(src), "--name", name, "--version", str(st.level)]
        t = timed([*argv, "--store", str(st.store), "--zstd-level", str(st.level), "--json"])
        if not t.ok:
            raise BenchError(f"sledge image import {src}: {t.error()}")
        st.digest, st.seconds = t.stdout.strip().splitlines()[-1].strip(), t.seconds
        table = chunk_table(st.store, f"{name}:{st.level}")
        st.files = chunk_files(st.store, table)
        st.stored = sum(f.stat().st_size for f in st.files)
        st.data = sum(c["length"] for c in table if c["kind"] == "data")
        # a chunk zstd could not shrink by 1/64 is stored raw (docs/image-format.md): not zstd's input
        packed = [c for c in table if c["kind"] == "data" and c["stored_len"] < c["length"]]
        st.zstd_files = chunk_files(st.store, packed)
        st.zstd_data = sum({c["digest"]: c["length"] for c in packed}.values())
        return st

    # ---- measurements ------------------------------------------------------------------------

    def url(self, path: Path) -> str:
        assert self.web is not None
        return f"{self.web.base}/{path.relative_to(self.www)}"

    def run_all(self, web: Nginx, device: str) -> None:
        self.web, self.device = web, device
        for rep in range(1, self.reps + 1):
            self.rep = rep
            log(f"F: repetition {rep}/{self.reps}")
            self.line_rate()
            self.alone()
            for level in self.levels:
                self.zstd_rate(level)
                self.sledge(level, self.stores[level], self.raw)
            self.sledge(0, self.random_store, self.random)
            self.peers()

    def _timed(self, stages: list[list[str]], served: list[Path], *, discard_stdout: bool = False) -> Timed:
        drop_caches()
        warm(served)
        warm_programs(stages)
        return timed_pipeline(stages, discard_stdout=discard_stdout)

    def line_rate(self) -> None:
        discard(self.device)
        argv = ["fio", "--name=w", f"--filename={self.device}", "--rw=write", "--bs=4M", "--direct=1"]
        argv += ["--ioengine=libaio", "--iodepth=8", f"--size={self.size}", "--output-format=json"]
        t = self._timed([argv], [])
        fio = self.row("fio", "  fio 4 MiB O_DIRECT writes, iodepth 8 (loop device)")
        curl = self.row("curl", "  curl of the raw image -> /dev/null (nginx, 127.0.0.1)")
        if not t.ok:
            fio.failures.append(f"rep {self.rep}: {t.error()}")
            return
        job = json.loads(t.stdout[t.stdout.index("{") :])["jobs"][0]["write"]
        fio.rates.append(job["bw_bytes"] / MB)
        self.cpu_of("fio", "fio (writing alone)").add(t, self.size)
        c = self._timed([["curl", "-sS", "--fail", "-o", "/dev/null", self.url(self.random)]], [self.random])
        if not c.ok:
            curl.failures.append(f"rep {self.rep}: {c.error()}")
            return
        curl.rates.append(self.size / c.seconds / MB)
        self.cpu_of("curl", "curl of the raw image -> /dev/null (receiving alone)").add(c, self.size)
        self.line.rates.append(min(fio.rates[-1], curl.rates[-1]))

    def alone(self) -> None:
        """blake3 over the image's size, and curl of the compressible store's chunk files."""
        t = timed([tool("python"), "-c", HASH, str(self.size)])
        start = timed([tool("python"), "-c", HASH, "0"])  # Python's start and imports, taken off
        if t.ok and start.ok:
            t.cpu -= start.cpu
            self.cpu_of("blake3", "blake3 of every byte (one thread, in memory)").add(t, self.size)
        st = self.stores[self.levels[0] if 3 not in self.levels else 3]
        config = self.work / "chunks.curl"
        config.write_text("".join(f'url = "{self.url(f)}"\noutput = "/dev/null"\n' for f in st.files))
        c = self._timed([["curl", "-sS", "--fail", "-K", str(config)]], st.files)
        if c.ok:
            label = f"curl of the level-{st.level} chunk files -> /dev/null (receiving them alone)"
            self.cpu_of("curl-chunks", label).add(c, self.size)

    def zstd_rate(self, level: int) -> None:
        st = self.stores[level]
        row = self.row(f"zstd-{level}", f"  `zstd -d -T0` of the level-{level} chunk files -> /dev/null")
        argv = ["zstd", "-d", "-T0", "-q", "-c", *map(str, st.zstd_files)]
        t = self._timed([argv], st.zstd_files, discard_stdout=True)
        if not t.ok:
            row.failures.append(f"rep {self.rep}: {t.error()}")
            return
        row.rates.append(st.zstd_data / t.seconds / MB)
        self.cpu_of(f"zstd-{level}", f"zstd -d of the level-{level} chunks (decompressing alone)").add(
            t, self.size
        )

    def sledge(self, level: int, st: Stored, image: Path) -> None:
        what = f"compressible, zstd level {level}" if level else "fully random"
        row = self.row(f"sledge-{level}", f"sledge fresh (`--no-inplace`), {what}")
        argv = write_argv(
            self.url(st.store / "manifests" / st.digest), self.url(st.store), self.device, inplace=False
        )
        discard(self.device)
        t = self._timed([argv], [st.store / "manifests" / st.digest, *st.files])
        self._count(row, t, image, gpt_fixed=True)
        if t.ok:
            self.cpu_of(f"sledge-{level}", f"sledge, {what}").add(t, self.size)
            busy = write_report(t)["busy"]
            row.notes[:] = ["busy thread-s: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(busy.items()))]

    def peers(self) -> None:
        bmap = ["bmaptool", "-q", "copy", "--bmap", str(self.raw.with_suffix(".bmap")), self.url(self.zst)]
        dd = ["dd", f"of={self.device}", "bs=4M", "oflag=direct", "iflag=fullblock", "status=none"]
        pipe = [["curl", "-sS", "--fail", self.url(self.zst)], ["zstd", "-d", "-q", "-c"], dd]
        for key, label, stages in (
            ("bmaptool", "`bmaptool copy` of the zstd image with its bmap", [[*bmap, self.device]]),
            ("curl-zstd-dd", "`curl | zstd -d | dd oflag=direct`", pipe),
        ):
            discard(self.device)
            t = self._timed(stages, [self.zst])
            self._count(self.row(key, label), t, self.raw)
            if t.ok:
                self.cpu_of(key, label).add(t, self.size)

    def _count(self, row: Row, t: Timed, image: Path, *, gpt_fixed: bool = False) -> None:
        """gpt_fixed: sledge moves a GPT image's backup to the bigger loop device's end; peers copy bytes."""
        if not t.ok:
            row.failures.append(f"rep {self.rep}: {t.error()}")
            return
        ok, why = check_written(image, self.device, self.size, gpt_fixed=gpt_fixed)
        if not ok:
            row.failures.append(f"rep {self.rep}: cmp: {why or 'differs'}")
            return
        row.rates.append(self.size / t.seconds / MB)

    # ---- results -----------------------------------------------------------------------------

    def _sum(self, *keys: str) -> float:
        return sum(self.cpu[k].value for k in keys) if all(k in self.cpu for k in keys) else float("nan")

    def table_rows(self) -> list[Row]:
        base = self.stores[3] if 3 in self.stores else self.stores[self.levels[0]]
        out = [
            heading(
                f"F. compressible image: {human(self.size)}, data {human(base.data)}, "
                f"stored {human(base.stored)} at level {base.level} (ratio: to line rate)"
            ),
            self.line,
            self.rows.get("fio", Row("fio")),
            self.rows.get("curl", Row("curl")),
        ]
        for level in self.levels:
            st = self.stores[level]
            zrow, srow = self.rows.get(f"zstd-{level}"), self.rows.get(f"sledge-{level}")
            if zrow is not None:
                zrow.notes[:] = [
                    f"{len(st.zstd_files)} of {len(st.files)} chunk files stored with zstd; "
                    f"stored {human(st.stored)} ({st.stored / max(st.data, 1):.2f} of data), "
                    f"import {self.size / st.seconds / MB:.0f} MB/s"
                ]
                out.append(zrow)
            if srow is not None and zrow is not None and zrow.rates and srow.rates:
                limit = min(self.line.rate, zrow.rate)
                srow.notes.insert(0, f"{srow.rate / limit:.2f}x min(line rate, zstd -d)")
            if srow is not None:
                out.append(srow)
        for key in ("bmaptool", "curl-zstd-dd", "sledge-0"):
            if key in self.rows:
                out.append(self.rows[key])
        cpu = Row("CPU seconds per GiB written (user + system, rusage; medians)")
        cpu.heading = True
        out.append(cpu)
        for c in self.cpu.values():
            r = Row(f"  {c.label}")
            r.notes = [f"{c.value:.2f} CPU-s/GiB (runs {' '.join(f'{v:.2f}' for v in c.values)})"]
            out.append(r)
        return out

    def targets(self) -> list[Target]:
        out: list[Target] = []
        for level in self.levels:
            z, s = self.rows.get(f"zstd-{level}"), self.rows.get(f"sledge-{level}")
            if z is None or s is None or not (z.rates and s.rates and self.line.rates):
                continue
            got = s.rate / min(self.line.rate, z.rate)
            label = f"compressible (zstd {level}): sledge vs min(line rate, zstd -d)"
            out.append(Target(label, ">= 0.8x", f"{got:.2f}x", got >= 0.8))
        ref = self._sum("curl", "fio", "blake3")
        got = self.cpu["sledge-0"].value if "sledge-0" in self.cpu else float("nan")
        out.append(
            Target(
                "fully random: sledge CPU-s/GiB vs curl + fio + blake3",
                "<= 1.3x",
                f"{got:.2f} vs {ref:.2f}: {got / ref:.2f}x",
                got / ref <= 1.3,
            )
        )
        level = 3 if 3 in self.levels else self.levels[0]
        ref = self._sum("curl-chunks", f"zstd-{level}", "fio", "blake3")
        got = self.cpu[f"sledge-{level}"].value if f"sledge-{level}" in self.cpu else float("nan")
        out.append(
            Target(
                f"compressible (zstd {level}): sledge CPU-s/GiB vs curl of chunks + zstd -d + fio + blake3",
                "<= 1.3x",
                f"{got:.2f} vs {ref:.2f}: {got / ref:.2f}x",
                got / ref <= 1.3,
            )
        )
        return out


def run_speed_bench(
    work: Path, size: int, reps: int, image: Path | None, levels: list[int]
) -> tuple[list[Row], list[Target]]:
    bench = SpeedBench(work, size, reps, image, levels)
    bench.prepare()
    loop_size = -(-(bench.size + bench.size // 4) // MiB) * MiB
    with Nginx(bench.www, work / "nginx") as web, LoopDevice(work / "loop.bin", loop_size) as loop:
        bench.run_all(web, loop.device)
    return bench.table_rows(), bench.targets()
