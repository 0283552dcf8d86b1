"""The run's report: a summary table, `report.json`, `jobs.jsonl` and `timeline.png`.

Times in the report are seconds from the start of the load. Throughput is the jobs answered
per second between the start of the load and the last first result; latency is what the
producer sees, from just before publishing to the first result.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.records import Accountant, Check, ControlEvent, JobRecord

EVENT_COLOURS = {"control": "tab:blue", "fault": "tab:red", "info": "tab:gray"}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def build_report(
    accountant: Accountant, *, started_at: float, stopped_at: float, events: list[ControlEvent],
    checks: list[Check], run: dict[str, Any],
) -> dict[str, Any]:
    counts = accountant.counts()
    records = list(accountant.records.values())
    answered = [r for r in records if r.answered_at is not None]
    latencies = [r.latency_ms for r in answered if r.latency_ms is not None]
    last = max((r.answered_at for r in answered if r.answered_at is not None), default=stopped_at)
    load_s = max(stopped_at - started_at, 1e-9)
    problems = [f"{counts.lost} lost"] if counts.lost else []
    problems += [f"{counts.failed} failed"] if counts.failed else []
    problems += [f"check failed: {c.name}" for c in checks if not c.passed]
    return {
        "run": {**run, "load_seconds": round(load_s, 3)},
        "passed": not problems,
        "problems": problems,
        "summary": {
            **asdict(counts),
            "throughput_jobs_per_s": round(len(answered) / max(last - started_at, 1e-9), 3) if answered else 0.0,
            "offered_jobs_per_s": round(counts.submitted / load_s, 3),
            "latency_ms": {
                "p50": _ms(percentile(latencies, 50)), "p95": _ms(percentile(latencies, 95)),
                "p99": _ms(percentile(latencies, 99)), "max": _ms(max(latencies, default=None)),
            },
        },
        "versions": dict(sorted(Counter(r.version or "?" for r in answered).items())),
        "workers": dict(sorted(Counter(r.worker_id or "?" for r in answered).items())),
        "errors": dict(sorted(Counter(r.error_code or "?" for r in records if r.status == "error").items())),
        "checks": [asdict(c) for c in checks],
        "events": [{"t_s": round(e.at - started_at, 3), "label": e.label, "kind": e.kind, "ok": e.ok}
                   for e in events],
        "timeline": timeline(records, started_at),
    }


def timeline(records: list[JobRecord], t0: float, bucket_s: float = 1.0) -> list[dict[str, Any]]:
    """Per bucket: jobs submitted, answered (by first result), failed, and latency percentiles."""
    times = [r.submitted_at for r in records] + [r.answered_at for r in records if r.answered_at is not None]
    if not times:
        return []
    size = int((max(times) - t0) // bucket_s) + 1
    submitted, answered, failed, lost = [0] * size, [0] * size, [0] * size, [0] * size
    latencies: list[list[float]] = [[] for _ in range(size)]
    for r in records:
        sent = max(0, int((r.submitted_at - t0) // bucket_s))
        submitted[sent] += 1
        lost[sent] += r.status == "lost"
        if r.answered_at is not None:
            got = max(0, int((r.answered_at - t0) // bucket_s))
            answered[got] += 1
            failed[got] += r.status == "error"
            if r.latency_ms is not None:
                latencies[got].append(r.latency_ms)
    return [
        {"t_s": i * bucket_s, "submitted": submitted[i], "answered": answered[i], "failed": failed[i],
         "lost": lost[i], **{f"p{q}_ms": _ms(percentile(latencies[i], q)) for q in (50, 95, 99)}}
        for i in range(size)
    ]


def write_files(report: dict[str, Any], accountant: Accountant, started_at: float, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.json", "jobs": out / "jobs.jsonl", "plot": out / "timeline.png"}
    report["files"] = {k: str(v) for k, v in files.items()}
    files["report"].write_text(json.dumps(report, indent=2) + "\n")
    with files["jobs"].open("w") as jobs:
        for record in accountant.records.values():
            jobs.write(json.dumps(record.to_json(started_at)) + "\n")
    plot(report, files["plot"])
    return files


def plot(report: dict[str, Any], path: Path) -> Path:
    """Throughput and latency percentiles per second, control events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timeline"]
    t = [b["t_s"] + 0.5 for b in rows]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5), constrained_layout=True)
    run = report["run"]
    figure.suptitle(f"hotswap loadtest: {run.get('scenario')} on {run.get('model')} ({run.get('loop')})")
    top.bar(t, [b["answered"] for b in rows], width=0.9, color="tab:green", alpha=0.6, label="answered/s")
    edges = [b["t_s"] for b in rows] + [rows[-1]["t_s"] + 1] if rows else [0.0]
    top.stairs([b["submitted"] for b in rows], edges, color="black", linewidth=1, label="submitted/s")
    failed = [(x, b["failed"]) for x, b in zip(t, rows, strict=True) if b["failed"]]
    if failed:
        top.bar([x for x, _ in failed], [n for _, n in failed], width=0.9, color="tab:red", label="failed/s")
    lost = [(x, b["lost"]) for x, b in zip(t, rows, strict=True) if b["lost"]]
    if lost:
        top.scatter([x for x, _ in lost], [0] * len(lost), marker="x", color="tab:red", zorder=3,
                    label="lost (by submit time)")
    top.set_ylabel("jobs per second")
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        points = [(x, b[f"p{q}_ms"]) for x, b in zip(t, rows, strict=True) if b[f"p{q}_ms"] is not None]
        bottom.plot([x for x, _ in points], [y for _, y in points], style, marker=".", label=f"p{q}")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since the load started")
    for event in report["events"]:
        colour = EVENT_COLOURS.get(event["kind"], "tab:gray")
        for axis in (top, bottom):
            axis.axvline(event["t_s"], color=colour, linestyle="--", linewidth=1, alpha=0.8)
        top.annotate(event["label"], (event["t_s"], 1), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=7, color=colour, va="top", ha="right",
                     bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def print_report(report: dict[str, Any], console: Console) -> None:
    s, run = report["summary"], report["run"]
    lat = s["latency_ms"]
    table = Table(title=f"loadtest {run['scenario']}: {run['model']}, {run['loop']}, {run['load_seconds']:.1f} s",
                  title_justify="left")
    for column in ("submitted", "answered", "ok", "failed", "expired", "lost", "duplicated", "jobs/s",
                   "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column, justify="right")

    def red(n: int) -> str:
        return f"[red]{n}[/red]" if n else str(n)

    table.add_row(
        str(s["submitted"]), str(s["answered"]), str(s["ok"]), red(s["failed"]), red(s["expired"]), red(s["lost"]),
        red(s["duplicated"]), f"{s['throughput_jobs_per_s']:.1f}",
        *(f"{lat[q]:.1f}" if lat[q] is not None else "-" for q in ("p50", "p95", "p99")),
    )
    console.print(table)
    breakdown = Table(show_header=True, title_justify="left")
    breakdown.add_column("by")
    breakdown.add_column("counts")
    breakdown.add_row("version", ", ".join(f"{k}: {v}" for k, v in report["versions"].items()) or "-")
    breakdown.add_row("worker", ", ".join(f"{k}: {v}" for k, v in report["workers"].items()) or "-")
    if report["errors"]:
        breakdown.add_row("error", ", ".join(f"{k}: {v}" for k, v in report["errors"].items()))
    extras = {"duplicate results": s["duplicate_results"], "redelivered copies": s["redeliveries"],
              "retried (attempt > 1)": s["retried"], "unexpected": s["unexpected"], "invalid": s["invalid"]}
    breakdown.add_row("other", ", ".join(f"{k}: {v}" for k, v in extras.items()))
    console.print(breakdown)
    for event in report["events"]:
        console.print(f"  [dim]t={event['t_s']:7.2f} s[/dim]  {event['label']}")
    for check in report["checks"]:
        mark = "[green]✓[/green]" if check["passed"] else "[red]✗[/red]"
        console.print(f"  {mark} {check['name']}: {check['detail']}")
    if report["passed"]:
        console.print("[green]PASS[/green]: nothing lost, nothing failed")
    else:
        console.print(f"[red]FAIL[/red]: {', '.join(report['problems'])}")
    for name, path in report.get("files", {}).items():
        console.print(f"  {name}: {path}")
