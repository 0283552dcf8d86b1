"""The benchmarks' pure parts: goals, measured ratios, results, the tables and the JSON.

No I/O apart from printing: the benchmarks measure, this module judges and shows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from control.operator import WaitReport
from loadtest.bench_profile import print_profiles
from loadtest.records import JobRecord
from loadtest.report import percentile, timeline

Op = Literal[">=", "<=", "=="]


@dataclass(frozen=True)
class Goal:
    op: Op
    target: float

    def met(self, value: float | None) -> bool | None:
        """None when there is nothing to judge (the value could not be measured)."""
        if value is None:
            return None
        if self.op == ">=":
            return value >= self.target
        if self.op == "<=":
            return value <= self.target
        return value == self.target

    def __str__(self) -> str:
        return f"{self.op} {self.target:g}"


@dataclass(frozen=True)
class Metric:
    """One judged figure: a ratio measured side by side, or a count (lost, failed)."""

    name: str
    value: float | None
    goal: Goal | None = None  # None: reported, not judged
    unit: str = ""

    @property
    def passed(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.value)

    def shown(self) -> str:
        if self.value is None:
            return "-"
        text = f"{self.value:.0f}" if self.value == int(self.value) and abs(self.value) >= 10 else f"{self.value:.3g}"
        return f"{text} {self.unit}".rstrip()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit,
                "goal": str(self.goal) if self.goal else None, "passed": self.passed}


@dataclass
class BenchResult:
    number: int
    title: str
    metrics: list[Metric] = field(default_factory=list)
    #: Rows of the benchmark's own table (all with the same keys), absolute figures included.
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # everything else worth keeping
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "title": self.title, "metrics": [m.to_json() for m in self.metrics],
                "rows": self.rows, "figures": self.figures, "notes": self.notes, "error": self.error,
                "seconds": round(self.seconds, 1)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def latency_p99(records: Sequence[JobRecord], *, answered_from: float | None = None,
                answered_to: float | None = None) -> float | None:
    """p99 latency (ms) of the jobs first answered within [answered_from, answered_to)."""
    latencies = [r.latency_ms for r in records if r.latency_ms is not None and r.answered_at is not None
                 and (answered_from is None or r.answered_at >= answered_from)
                 and (answered_to is None or r.answered_at < answered_to)]
    return percentile(latencies, 99)


@dataclass(frozen=True)
class Spike:
    steady_p99_ms: float | None
    worst_bucket_p99_ms: float | None
    buckets: int  # 1-s buckets in the change window that had answers
    #: The same statistic without a change: the worst p99 of the whole buckets before it. The
    #: worst of a few buckets is higher than a pooled p99 even when nothing happens.
    steady_worst_bucket_p99_ms: float | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.worst_bucket_p99_ms, self.steady_p99_ms)

    @property
    def bucket_ratio(self) -> float | None:
        """The change's worst bucket against the steady part's worst bucket."""
        return ratio(self.worst_bucket_p99_ms, self.steady_worst_bucket_p99_ms)


def latency_spike(records: Sequence[JobRecord], t0: float, change_start: float, change_end: float, *,
                  steady_from: float | None = None, after_s: float = 2.0, bucket_s: float = 1.0) -> Spike:
    """The worst p99 of the 1-s buckets (by answer time) from the change's start to `after_s` past
    its end (a backlog drains after the change), against the p99 of the jobs answered before it.
    Times are monotonic; buckets count from `t0`, the start of the load."""
    steady = latency_p99(records, answered_from=steady_from, answered_to=change_start)
    first = int((change_start - t0) // bucket_s)
    last = int((change_end + after_s - t0) // bucket_s)
    buckets = [b for b in timeline(list(records), t0, bucket_s) if b["p99_ms"] is not None]
    worst = [b["p99_ms"] for b in buckets if first <= int(b["t_s"] / bucket_s) <= last]
    before = [b["p99_ms"] for b in buckets if b["t_s"] + bucket_s <= change_start - t0
              and (steady_from is None or b["t_s"] >= steady_from - t0)]
    return Spike(steady, max(worst, default=None), len(worst), max(before, default=None))


def visible_after_ms(report: WaitReport, phase: str = "swap") -> float | None:
    """How long after a command was issued its `phase` had happened on every worker (the slowest
    worker's time, ms, by the workers' clocks on this machine); None when a worker did not report it."""
    delays = []
    for worker in report.workers:
        at = next((p.at for p in report.progress.get(worker, []) if p.phase == phase), None)
        if at is None:
            return None
        delays.append((at - report.command.issued_at).total_seconds() * 1000)
    return max(delays, default=None)


Totals = dict[str, tuple[float, float]]


def histogram_totals(exposition: str) -> Totals:
    """(sum, count) of a worker's batch-size histogram (`batch`) and job-phase histograms (by phase),
    all models together, from its /metrics text."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            name, _, part = sample.name.rpartition("_")
            if part not in ("sum", "count"):
                continue
            if name == "hotswap_batch_size":
                key = "batch"
            elif name == "hotswap_job_phase_seconds":
                key = sample.labels.get("phase", "?")
            else:
                continue
            pair = totals.setdefault(key, [0.0, 0.0])
            pair[0 if part == "sum" else 1] += float(sample.value)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def worker_means(before: Totals, after: Totals) -> dict[str, float | None]:
    """Between two /metrics snapshots: the mean batch size and the mean ms of each job phase."""
    means: dict[str, float | None] = {}
    for key, (total, count) in after.items():
        total0, count0 = before.get(key, (0.0, 0.0))
        mean_value = ratio(total - total0, count - count0)
        scale = 1.0 if key == "batch" else 1000.0  # phases are in seconds: shown in ms
        means["mean_batch" if key == "batch" else f"{key}_ms"] = None if mean_value is None else mean_value * scale
    return means


def summary_rows(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """One row per judged (or reported) metric, and one per benchmark that failed to run."""
    rows: list[dict[str, Any]] = []
    for result in results:
        label = f"{result.number}. {result.title}"
        if result.error is not None:
            rows.append({"benchmark": label, "measured": "error", "value": None, "goal": None,
                         "passed": None, "error": result.error})
        for metric in result.metrics:
            rows.append({"benchmark": label, "measured": metric.name, "value": metric.value,
                         "shown": metric.shown(), "goal": str(metric.goal) if metric.goal else None,
                         "passed": metric.passed})
    return rows


def verdict(passed: bool | None) -> str:
    return {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]-[/dim]"}[passed]


def print_result(result: BenchResult, console: Console) -> None:
    table = Table(title=f"bench {result.number}: {result.title} ({result.seconds:.0f} s)", title_justify="left")
    columns = list(result.rows[0]) if result.rows else []
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in result.rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    if result.rows:
        console.print(table)
    if result.figures.get("profile"):
        print_profiles(result.figures["profile"], console)
    for metric in result.metrics:
        goal = f" (goal {metric.goal})" if metric.goal else ""
        console.print(f"  {verdict(metric.passed)} {metric.name} = {metric.shown()}{goal}")
    for note in result.notes:
        console.print(f"  [dim]{note}[/dim]")
    if result.error:
        console.print(f"  [red]error: {result.error}[/red]")


def print_summary(results: Sequence[BenchResult], console: Console) -> None:
    table = Table(title="bench summary (ratios measured side by side in this run)", title_justify="left")
    for column, justify in (("benchmark", "left"), ("measured", "left"), ("value", "right"), ("goal", "right"),
                            ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in summary_rows(results):
        if row["measured"] == "error":
            table.add_row(row["benchmark"], f"[red]error: {row['error']}[/red]", "-", "-", verdict(None))
        else:
            table.add_row(row["benchmark"], row["measured"], row["shown"], row["goal"] or "-", verdict(row["passed"]))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
