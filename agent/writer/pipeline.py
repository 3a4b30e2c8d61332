"""The write pipeline: a fixed pool of threads, each with two aligned buffers, each
taking the next chunk and carrying it through check -> fetch -> verify -> write.

Threads are the right tool here: pread/pwrite, recv_into, blake3 and zstd all
release the GIL, so N threads keep N chunks in flight (N HTTP requests, N device
writes) with memory fixed at 2 x N x chunk_size. Back-pressure is implicit: a
thread takes a new chunk only when its last one is on the disk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import blake3

from agent import blockdev
from agent.disk import gpt, undo
from agent.disk.expect import sledge_edits
from agent.disk.tables import Read
from agent.image.manifest import Chunk, ChunkKind, Manifest
from agent.writer.device import OpenTarget
from agent.writer.drift import Drift, classify
from agent.writer.errors import Cancelled, ChunkUnavailable, Deferred, TargetError, VerifyFailed, WriteError
from agent.writer.events import Counters, Listener, Phase, SourceEvent, WriteReport
from agent.writer.fetch import RetryPolicy, SourceSet
from agent.writer.plan import Action, PlanOptions, Step, Target, ZeroMode, after_check, iter_plan
from agent.writer.sources import ChunkSource

BUFFER_BUDGET = 256 << 20


@dataclass(frozen=True)
class WriteOptions:
    inplace: bool = True
    zero_mode: ZeroMode = ZeroMode.ZERO
    verify: bool = False
    workers: int = 0  # threads that check, fetch, decompress and verify; 0: sized to the cores
    write_threads: int = 0  # threads that write verified chunks; 0: sized to the cores
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fix_gpt: bool = True
    progress_interval: float = 0.5
    # hooks for peer sharing (agent.peer.swarm): the fetch order (a source may hand a step back to
    # it by raising Deferred), and each chunk once it is on the target verified (written, or found
    # in place)
    order: Callable[[Iterator[Step]], Iterator[Step]] | None = None
    on_verified: Callable[[Chunk], None] | None = None
    # a chunk an in-place check found wrong: True if the order takes it as a fetch step (a thread
    # fetches it when the order hands it out), False if the thread that checked it fetches it now
    refetch: Callable[[Step], bool] | None = None


def thread_counts(options: WriteOptions, cores: int) -> tuple[int, int]:
    """(fetching threads, writing threads): the options' own, or sized to the cores. Every fetching
    thread decompresses and hashes its chunk (zstd and blake3 release the GIL), so there must be at
    least one per core, and a couple more to keep the cores busy while some wait on the network."""
    workers = options.workers or max(4, cores + 2)
    write_threads = options.write_threads or max(3, min(8, cores // 2))
    return workers, write_threads


class Writer:
    def __init__(
        self,
        manifest: Manifest,
        manifest_digest: str,
        sources: Sequence[ChunkSource],
        target: OpenTarget,
        options: WriteOptions = WriteOptions(),
        listener: Listener | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if manifest.image_size > target.size:
            raise WriteError(
                f"target {target.path}: image needs {manifest.image_size} bytes, has {target.size}"
            )
        self.manifest = manifest
        self.digest = manifest_digest
        self.target = target
        self.options = options
        self.listener = listener
        self.cancel = cancel or threading.Event()
        self.counters = Counters(manifest.image_size, len(manifest), listener, options.progress_interval)
        self.sources = SourceSet(sources, options.retry, self._source_failed, self.cancel)
        budget = max(4, BUFFER_BUDGET // manifest.chunk_size)  # buffers of one chunk each
        workers, write_threads = thread_counts(options, os.cpu_count() or 2)
        self.write_threads = max(1, min(write_threads, budget // 4))
        self.workers = max(1, min(workers, (budget - self.write_threads - 1) // 2))
        self._lock = threading.Lock()
        self._steps_lock = threading.Lock()
        self._error: BaseException | None = None
        # Fetching threads verify chunks and hand them to write threads through a bounded
        # queue; buffers come from a fixed pool, so memory is fixed and a slow disk holds
        # the fetching back (and a slow network the writing).
        count = 2 * self.workers + self.write_threads + 1
        self._buffers: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self._buffers.put(mmap.mmap(-1, manifest.chunk_size))
        # (chunk, its buffer, the verified bytes, whether they were downloaded)
        self._writes: queue.Queue[tuple[Chunk, mmap.mmap, memoryview, bool] | None] = queue.Queue()
        self._undo: undo.Writes = []

    def _source_failed(self, event: SourceEvent) -> None:
        if self.listener:
            self.listener(event)

    def _phase(self, name: str) -> None:
        if self.listener:
            self.listener(Phase(name))

    def run(self) -> WriteReport:
        start = time.monotonic()
        target = Target(fresh=self.target.fresh, zeroout_cheap=self.target.zeroout_cheap)
        steps = iter_plan(self.manifest, target, PlanOptions(self.options.inplace, self.options.zero_mode))
        if self.options.inplace and not self.target.fresh:
            self._undo = self._image_tables()
        if self.options.order is not None:
            steps = self.options.order(steps)
        self._phase("write")
        with self._interrupt_on_cancel():
            self._run_threads(steps, self._work)
        self._phase("sync")
        t0 = time.perf_counter()
        self._sync()
        self.counters.add_busy({"sync": time.perf_counter() - t0})
        relocated = False
        if self.options.fix_gpt and self.target.is_block and self.target.size > self.manifest.image_size:
            self._phase("gpt")
            sector = blockdev.logical_sector_size(self.target.buffered_fd)
            relocated = gpt.fix_backup_gpt(self.target.buffered_fd, sector, self.target.size)
        if self.options.verify:
            self._phase("verify")
            skip_zero = self.options.zero_mode is ZeroMode.DONT_CARE
            if relocated:  # the table sectors sledge just rewrote differ from the image by design
                drift = self.drift(skip_zero)
                if not drift.clean:
                    raise VerifyFailed(drift.drifted, drift.tables)
            else:
                self.verify(skip_zero)
        self.counters.emit()
        c = self.counters
        return WriteReport(
            manifest=self.digest,
            target=self.target.path,
            image_size=self.manifest.image_size,
            chunks_total=len(self.manifest),
            chunks_inplace=c.inplace,
            chunks_zero=c.zero,
            chunks_skipped=c.skipped,
            chunks_fetched=c.fetched_chunks,
            chunks_restored=c.restored,
            fetched_bytes=c.fetched,
            written_bytes=c.written,
            zeroed_bytes=c.zeroed,
            seconds=time.monotonic() - start,
            busy=dict(c.busy),
            bytes_by_source=dict(c.by_source),
            dropped_sources=tuple(self.sources.dropped),
            gpt_relocated=relocated,
            verified=self.options.verify,
        )

    def _image_tables(self) -> undo.Writes:
        """How to turn the disk's table sectors back into the image's, if an earlier deploy of
        sledge edited them (read before anything is written)."""
        fd = self.target.buffered_fd
        try:
            sector = blockdev.logical_sector_size(fd) if self.target.is_block else 512
            return undo.image_tables(
                lambda offset, length: os.pread(fd, length, offset),
                self.manifest.image_size,
                self.target.size,
                sector,
            )
        except OSError:
            return []  # no guess: those chunks are downloaded, as without one

    def _sync(self) -> None:
        for fd in {self.target.fd, self.target.buffered_fd}:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise TargetError(f"target {self.target.path}: fdatasync: {exc.strerror}") from None

    @contextlib.contextmanager
    def _interrupt_on_cancel(self) -> Iterator[None]:
        """While the threads run, a cancel also aborts the sources' requests in flight, so a
        stuck server cannot hold a cancelled job until its deadline.

        The watch waits on the cancel itself and looks at `done` once a second: a watch that
        polled the cancel ten times a second was ten wake-ups a second for nothing in every agent.
        It is not joined (it ends within that second), and once `done` it interrupts nothing."""
        done = threading.Event()

        def watch() -> None:
            while not self.cancel.wait(1.0):
                if done.is_set():
                    return
            if not done.is_set():
                for source in self.sources.sources:
                    source.interrupt()

        threading.Thread(target=watch, name="cancel-watch", daemon=True).start()
        try:
            yield
        finally:
            done.set()

    # -- threads -----------------------------------------------------------------

    def _run_threads(self, steps: Iterator[Step], work: object, writing: bool = True) -> None:
        """Run `work` on every step in the checking/fetching threads, with write threads only
        when the work hands chunks over to be written (not for a read-back)."""
        writers = [
            threading.Thread(target=self._write_main, name=f"write-{i}", daemon=True)
            for i in range(self.write_threads if writing else 0)
        ]
        threads = [
            threading.Thread(target=self._thread_main, args=(steps, work), name=f"fetch-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in writers + threads:
            t.start()
        try:
            # Bounded waits in the main thread: a SIGINT landing just before it blocks in a join
            # does not interrupt the wait, and an unbounded join would hold Ctrl-C until the whole
            # write is done. Signals reach no other thread: there (the agent's jobs) it waits.
            step = 0.2 if threading.current_thread() is threading.main_thread() else None
            for t in threads:
                while t.is_alive():
                    t.join(step)
        except BaseException:
            # Ctrl-C in the caller's thread: the others stop at a chunk boundary, and none may
            # outlive run() (the caller closes the target's fds next)
            self._fail(Cancelled(f"write to {self.target.path} interrupted"))
            self.cancel.set()
            raise
        finally:
            for t in threads:
                t.join()
            for _ in writers:
                self._writes.put(None)
            for t in writers:
                t.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    def _next(self, steps: Iterator[Step]) -> Step | None:
        with self._lock:
            if self._error is not None:
                return None
            if self.cancel.is_set():
                self._error = Cancelled(f"write to {self.target.path} cancelled at a chunk boundary")
                return None
        # a lock of its own: the order hook may wait in next() for a chunk to be ready (peers), and
        # a thread failing or a Ctrl-C must not wait on that to record its error
        with self._steps_lock:
            return next(steps, None)

    def _thread_main(self, steps: Iterator[Step], work: object) -> None:
        timing: dict[str, float] = {}
        try:
            while (step := self._next(steps)) is not None:
                t0 = time.perf_counter()
                stored, raw = self._buffers.get(), self._buffers.get()  # blocks: back-pressure
                timing["wait_buffer"] = timing.get("wait_buffer", 0.0) + time.perf_counter() - t0
                handed = work(step, memoryview(stored), memoryview(raw), timing)  # type: ignore[operator]
                for buf in (stored, raw):
                    if buf is not handed:
                        self._buffers.put(buf)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.counters.add_busy(timing)

    def _write_main(self) -> None:
        """Writes verified chunks handed over by the fetching threads, and returns their buffers."""
        timing: dict[str, float] = {}
        while (item := self._writes.get()) is not None:
            chunk, buf, view, fetched = item
            try:
                if self._error is None:  # after a failure, only drain: nothing more is written
                    t0 = time.perf_counter()
                    try:
                        self.target.write(view, chunk.offset, aligned=True)
                    except OSError as exc:
                        raise TargetError(
                            f"target {self.target.path}: writing {chunk.describe()}: {exc.strerror or exc}"
                        ) from None
                    timing["write"] = timing.get("write", 0.0) + time.perf_counter() - t0
                    if fetched:
                        self.counters.add(done=chunk.length, fetched_chunks=1, written=chunk.length)
                    else:
                        self.counters.add(done=chunk.length, restored=1, written=chunk.length)
                    if self.options.on_verified is not None:
                        self.options.on_verified(chunk)
            except BaseException as exc:
                self._fail(exc)
            finally:
                view.release()
                self._buffers.put(buf)
        self.counters.add_busy(timing)

    # -- one chunk -----------------------------------------------------------------

    def _work(
        self, step: Step, stored: memoryview, raw: memoryview, timing: dict[str, float]
    ) -> mmap.mmap | None:
        """Carry one chunk as far as it goes here; returns the buffer handed to a write thread."""
        chunk, action = step.chunk, step.action
        if action is Action.CHECK:
            matches = self._matches(chunk, raw, timing)
            action = after_check(chunk, matches)
            if action is Action.SKIP:
                self.counters.add(done=chunk.length, inplace=1)
                if self.options.on_verified is not None and chunk.kind is ChunkKind.DATA:
                    self.options.on_verified(chunk)
                return None
            if action is Action.FETCH and self._restored(chunk, raw, timing):
                return self._hand_over(chunk, raw[: chunk.length], False, timing)
            refetch = self.options.refetch
            if action is Action.FETCH and refetch is not None and refetch(Step(chunk, Action.FETCH)):
                return None  # the order hands it out (peers: when one can serve it)
        if action is Action.SKIP:
            self.counters.add(done=step.size, skipped=step.count)
        elif action is Action.ZERO:
            t0 = time.perf_counter()
            try:
                self.target.zero(chunk.offset, step.size)
            except OSError as exc:
                raise TargetError(
                    f"target {self.target.path}: zeroing {step.size} bytes at offset {chunk.offset} "
                    f"(chunks {chunk.index}-{chunk.index + step.count - 1}): {exc.strerror or exc}"
                ) from None
            timing["zero"] = timing.get("zero", 0.0) + time.perf_counter() - t0
            self.counters.add(done=step.size, zero=step.count, zeroed=step.size)
        else:
            try:
                view, source = self.sources.fetch(chunk, stored, raw, timing)
            except Deferred:
                return None  # the order hook took the step back: some thread takes it later
            self.counters.add_source_bytes(source, chunk.stored_len)
            return self._hand_over(chunk, view, True, timing)
        return None

    def _hand_over(
        self, chunk: Chunk, view: memoryview, fetched: bool, timing: dict[str, float]
    ) -> mmap.mmap:
        """Queue verified bytes for a write thread; returns their buffer (now the write thread's)."""
        buf = view.obj
        assert isinstance(buf, mmap.mmap)
        t0 = time.perf_counter()
        self._writes.put((chunk, buf, view, fetched))
        timing["wait_write"] = timing.get("wait_write", 0.0) + time.perf_counter() - t0
        return buf

    def _restored(self, chunk: Chunk, raw: memoryview, timing: dict[str, float]) -> bool:
        """Whether the disk's bytes, just read into `raw`, become the chunk's own once sledge's
        earlier table edits are undone (then they are written back, verified, not downloaded)."""
        if not self._undo or not undo.overlaps(self._undo, chunk.offset, chunk.length):
            return False
        t0 = time.perf_counter()
        view = raw[: chunk.length]
        undo.lay_over(view, chunk.offset, self._undo)
        same = blake3.blake3(view).digest() == chunk.digest
        timing["inplace_hash"] = timing.get("inplace_hash", 0.0) + time.perf_counter() - t0
        return same

    def _matches(self, chunk: Chunk, buf: memoryview, timing: dict[str, float]) -> bool:
        t0 = time.perf_counter()
        view = buf[: chunk.length]
        fd = self.target.fd_for(chunk.length)
        got = 0
        while got < chunk.length:
            try:
                n = os.preadv(fd, [view[got:]], chunk.offset + got)
            except OSError as exc:
                raise TargetError(
                    f"target {self.target.path}: reading {chunk.describe()}: {exc.strerror}"
                ) from None
            if n == 0:
                break
            got += n
        t1 = time.perf_counter()
        same = got == chunk.length and blake3.blake3(view).digest() == chunk.digest
        timing["inplace_read"] = timing.get("inplace_read", 0.0) + t1 - t0
        timing["inplace_hash"] = timing.get("inplace_hash", 0.0) + time.perf_counter() - t1
        return same

    # -- read-back -----------------------------------------------------------------

    def verify(self, skip_zero: bool = False) -> None:
        """Read every chunk back past the page cache; raise VerifyFailed naming those that differ."""
        bad: list[Chunk] = []
        os.posix_fadvise(self.target.buffered_fd, 0, 0, os.POSIX_FADV_DONTNEED)

        def check(step: Step, stored: memoryview, raw: memoryview, timing: dict[str, float]) -> None:
            if not self._matches(step.chunk, raw, timing):
                with self._lock:
                    bad.append(step.chunk)

        chunks = (c for c in self.manifest if not (skip_zero and c.kind is ChunkKind.ZERO))
        self._run_threads((Step(c, Action.CHECK) for c in chunks), check, writing=False)
        if bad:
            raise VerifyFailed(sorted(bad, key=lambda c: c.index))

    def read_back(self, chunk: Chunk) -> bytes:
        """What the target holds in the chunk's range, past the page cache."""
        buf = mmap.mmap(-1, self.manifest.chunk_size)
        view = memoryview(buf)
        try:
            self._matches(chunk, view, {})
            return bytes(view[: chunk.length])
        finally:
            view.release()
            buf.close()

    def image_bytes(self, chunk: Chunk) -> bytes:
        """The chunk's verified image bytes, from the sources (zeros for a zero chunk)."""
        if chunk.kind is ChunkKind.ZERO:
            return bytes(chunk.length)
        stored, raw = mmap.mmap(-1, self.manifest.chunk_size), mmap.mmap(-1, self.manifest.chunk_size)
        view, _ = self.sources.fetch(chunk, memoryview(stored), memoryview(raw), {})
        data = bytes(view)
        view.release()
        return data

    def drift(self, skip_zero: bool = False) -> Drift:
        """Chunks that differ from the image, less those where only sledge's own table edits
        differ (replayed on the image's bytes and compared byte for byte)."""
        try:
            self.verify(skip_zero)
        except VerifyFailed as exc:
            fd = self.target.buffered_fd

            def disk(offset: int, length: int) -> bytes:
                return os.pread(fd, length, offset)

            try:
                sector = blockdev.logical_sector_size(fd) if self.target.is_block else 512
                image_size = self.manifest.image_size
                edits = sledge_edits(self._image_reader(), image_size, disk, self.target.size, sector)
                return classify(exc.bad, edits, image_size, sector, self.read_back, self.image_bytes, disk)
            except ChunkUnavailable:
                # the image's own bytes cannot be had (no source given, or none answers): every
                # chunk that differs counts as drift, the conservative answer
                return Drift(list(exc.bad), [])
        return Drift([], [])

    def _image_reader(self) -> Read:
        """The image's verified bytes by offset, fetched a chunk at a time (cached: tables span few)."""
        cache: dict[int, bytes] = {}

        def read(offset: int, length: int) -> bytes:
            out = bytearray()
            end = min(offset + length, self.manifest.image_size)
            while offset < end:
                chunk = self.manifest.chunk(offset // self.manifest.chunk_size)
                if chunk.index not in cache:
                    cache[chunk.index] = self.image_bytes(chunk)
                data = cache[chunk.index]
                piece = data[offset - chunk.offset : end - chunk.offset]
                out += piece
                offset += len(piece)
            return bytes(out)

        return read
