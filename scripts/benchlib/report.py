"""The one table: rows of MB/s (image bytes per wall-clock second), medians, ratios, and targets."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(eq=False)
class Row:
    label: str
    rates: list[float] = field(default_factory=list)  # MB/s of image size, one per repetition
    ref: Row | None = None  # ratio = median(rates) / median(ref.rates)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ratio_value: float | None = None  # a ratio that is not between rates (store size / data size)
    heading: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def rate(self) -> float:
        return median(self.rates)

    @property
    def ratio(self) -> float | None:
        if self.ratio_value is not None:
            return self.ratio_value
        if self.ref is None or not self.rates or not self.ref.rates:
            return None
        return self.rate / self.ref.rate

    def cells(self) -> list[str]:
        if self.heading:
            return [f"**{self.label}**", "", "", "", ""]
        rate = f"{self.rate:.0f}" if self.rates else ""
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else ""
        if self.failed:
            rate, ratio = "FAILED", "FAILED"
        runs = " ".join(f"{r:.0f}" for r in self.rates)
        return [self.label, rate, ratio, runs, "; ".join(self.notes + self.failures)]


def heading(text: str) -> Row:
    return Row(text, heading=True)


@dataclass
class Target:
    label: str
    required: str
    measured: str
    ok: bool


def table(rows: Sequence[Row]) -> str:
    head = ["row", "MB/s (median)", "ratio", "runs (MB/s)", "notes"]
    lines = [_line(head), _line(["---", "---:", "---:", "---:", "---"])]
    lines += [_line(r.cells()) for r in rows]
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    lines = [_line(["target", "required", "measured (median)", "result"]), _line(["---"] * 4)]
    lines += [_line([t.label, t.required, t.measured, "ok" if t.ok else "**MISSED**"]) for t in targets]
    return "\n".join(lines)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
