"""One deploy's peer sharing, put together: the swarm view, the peer server, the announce thread,
and the peer source in front of the job's own sources.

    with PeerSession(manifest, digest, job_id, announcer, target_fd, config, log) as peers:
        writer = Writer(..., peers.sources(origin), target, peers.options(options), ...)

Sharing is an optimisation: if the first announce fails, the session says so and the job runs
from its own sources until an announce works (a controller restarting, a tracker that refused it
once), then from peers too. The server keeps serving until the session closes (the deploy job's
end by default) plus `linger` seconds.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from agent.image.manifest import Manifest
from agent.peer.bucket import TokenBucket
from agent.peer.server import PeerServer, ServeLimits
from agent.peer.source import CappedSource, PeerOptions, PeerSource
from agent.peer.swarm import Announcer, PeerDropped, Swarm
from agent.writer.pipeline import WriteOptions
from agent.writer.sources import ChunkSource


@dataclass(frozen=True)
class PeerConfig:
    host: str = "0.0.0.0"  # where the peer server listens
    port: int = 0  # 0: any free port (announced to the tracker)
    serve: ServeLimits = field(default_factory=ServeLimits)
    fetch: PeerOptions = field(default_factory=PeerOptions)
    linger: float = 0.0  # seconds to keep serving after the session closes


class PeerSession:
    def __init__(
        self,
        manifest: Manifest,
        digest: str,
        job_id: str,
        announcer: Announcer,
        target_fd: int,
        config: PeerConfig = PeerConfig(),
        log: Callable[[str], None] = print,
        on_drop: Callable[[PeerDropped], None] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.swarm = Swarm(manifest, digest, job_id, announcer, on_drop or self._dropped)
        self.server = PeerServer(self.swarm, target_fd, config.host, config.port, config.serve, log)
        self.bucket = TokenBucket(config.fetch.download)
        self.source = PeerSource(self.swarm, config.fetch, self.bucket)
        self.swarm.patience = config.fetch.patience
        self.swarm.parallel = config.fetch.parallel
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _dropped(self, event: PeerDropped) -> None:
        self.log(f"peers: dropped {event.url}: {event.reason}")

    def __enter__(self) -> PeerSession:
        self.server.start()
        failing = ""
        try:
            self.swarm.announce()
        except Exception as exc:  # the tracker is an optimisation: the job's sources still serve
            self.log(f"peers: announce failed ({exc}); fetching from the sources until one works")
            failing = str(exc)
        self._thread = threading.Thread(
            target=self.swarm.run, args=(self.stop, self.log, failing), name="peer-announce", daemon=True
        )
        self._thread.start()
        return self

    def sources(self, origin: Sequence[ChunkSource]) -> list[ChunkSource]:
        """The peer source first, then the job's own, all under this agent's download cap."""
        capped: list[ChunkSource] = (
            [CappedSource(s, self.bucket) for s in origin] if self.bucket.rate else list(origin)
        )
        return [self.source, *capped]

    def options(self, base: WriteOptions) -> WriteOptions:
        return dataclasses.replace(
            base, order=self.swarm.order, on_verified=self.swarm.on_verified, refetch=self.swarm.refetch
        )

    def close(self) -> None:
        if self.config.linger > 0:
            time.sleep(self.config.linger)
        self.stop.set()
        self.swarm.news.set()  # wakes the announce thread at once
        self.source.close()
        if self._thread is not None:
            self._thread.join()
        self.server.close()
        if self.swarm.joined():  # any announce that worked (a later one too) made it a holding
            try:
                self.swarm.announce(leaving=True)  # nobody should wait on this agent any more
            except Exception as exc:  # the tracker forgets it after its ttl anyway
                self.log(f"peers: leaving announce failed: {exc}")
        stats = self.server.stats
        fetched = sum(self.source.bytes_by_peer.values())
        self.log(
            f"peers: fetched {fetched} bytes from {len(self.source.bytes_by_peer)} peers; served "
            f"{stats.served_bytes} bytes in {stats.served_chunks} chunks; refused {stats.refused} requests; "
            f"dropped {len(self.swarm.dropped)} peers; {self.source.busy_answers} asks found a peer busy"
        )

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
