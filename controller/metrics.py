"""Prometheus text metrics: request latency, bytes served, machines and jobs by state, refused
enrollments by reason (never a token, an address or a secret: only counts)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from controller.fleet.tracker import SwarmCounts
from controller.state.model import Counts
from controller.trust import Refusal

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: int = 0
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += seconds


@dataclass
class Metrics:
    latency: dict[tuple[str, str], _Histogram] = field(default_factory=lambda: defaultdict(_Histogram))
    responses: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    bytes_served: int = 0
    refusals: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by controller.trust.Refusal

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.latency[(method, route)].observe(seconds)
        self.responses[(method, route, status)] += 1

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def render(self, counts: Counts) -> str:
        lines = [
            "# HELP sledge_machines Machines by state.",
            "# TYPE sledge_machines gauge",
            *(f'sledge_machines{{state="{s}"}} {n}' for s, n in counts.machines.items()),
            "# HELP sledge_jobs Jobs by state.",
            "# TYPE sledge_jobs gauge",
            *(f'sledge_jobs{{state="{s}"}} {n}' for s, n in counts.jobs.items()),
            "# HELP sledge_served_bytes_total Bytes of manifests, chunks and boot files sent.",
            "# TYPE sledge_served_bytes_total counter",
            f"sledge_served_bytes_total {self.bytes_served}",
            "# HELP sledge_enrollment_refusals_total Refused enrollments and boots, by reason.",
            "# TYPE sledge_enrollment_refusals_total counter",
            *(f'sledge_enrollment_refusals_total{{reason="{r}"}} {self.refusals.get(r, 0)}' for r in Refusal),
            "# HELP sledge_http_responses_total HTTP responses by route and status.",
            "# TYPE sledge_http_responses_total counter",
        ]
        for (method, route, status), n in sorted(self.responses.items()):
            lines.append(
                f'sledge_http_responses_total{{method="{method}",route="{route}",status="{status}"}} {n}'
            )
        lines += [
            "# HELP sledge_http_request_seconds HTTP request latency (long-polls include their wait).",
            "# TYPE sledge_http_request_seconds histogram",
        ]
        for (method, route), h in sorted(self.latency.items()):
            labels = f'method="{method}",route="{route}"'
            for bound, n in zip(BUCKETS, h.counts, strict=True):
                lines.append(f'sledge_http_request_seconds_bucket{{{labels},le="{bound}"}} {n}')
            lines.append(f'sledge_http_request_seconds_bucket{{{labels},le="+Inf"}} {h.total}')
            lines.append(f"sledge_http_request_seconds_sum{{{labels}}} {h.sum:.6f}")
            lines.append(f"sledge_http_request_seconds_count{{{labels}}} {h.total}")
        return "\n".join(lines) + "\n"


def render_swarms(c: SwarmCounts) -> str:
    """The tracker's figures: how many deploy with peers now, and how often peers were found bad."""
    return "".join(
        f"# HELP {name} {about}\n# TYPE {name} {kind}\n{name} {value}\n"
        for name, kind, about, value in (
            ("sledge_swarms", "gauge", "Images deployed with peers now (swarms).", c.swarms),
            ("sledge_swarm_agents", "gauge", "Agents announcing in a swarm.", c.agents),
            (
                "sledge_peer_reports_total",
                "counter",
                "Reports by agents of a peer whose bytes failed verification (one per reporter and peer).",
                c.reports,
            ),
            (
                "sledge_peers_shunned_total",
                "counter",
                "Peers removed from a swarm on agents' reports (the machines' events say so).",
                c.shunned,
            ),
            (
                "sledge_peer_claims_lapsed_total",
                "counter",
                "Agents whose claim to their own origin share ran out with no chunk of theirs vouched for.",
                c.lapsed,
            ),
        )
    )
