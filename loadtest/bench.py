"""`hotswap loadtest bench`: the performance benchmarks of docs/architecture.md ("Targets"), side by side.

    1  pool vs in-process predict          pool(batch 1) ≥ 0.9 × in-process batch 1, pool(micro-batch) ≥ 0.9 ×
                                           in-process at the same batch size (and ≥ 1.5 × batch 1)
    2  trivial model vs raw aio-pika loop  worker ≥ 0.9 × a raw loop that decodes each job's image; worker CPU
                                           per job ≤ 1.3 × that loop's (128 px and 16 px PNGs)
    3  p99 during 10 updates + 10 rollbacks  ≤ 1.25 × steady p99; 0 lost, 0 failed
    4  RSS over 50 update/cleanup cycles   after 50 ≤ 1.1 × after 1
    5  rolling restart vs hot update       failed, lost, latency spike of each (hot update's ≤ 1.5 × steady)
    6  every family: pool vs in-process    pool ≥ 0.9 × the version's backend in-process (0.95 heavy)
    7  worker footprint vs a bare process  RSS ≤ 1.15 ×, start to ready ≤ 1.3 × a bare process loading the model

Every goal is a ratio measured in the same run (the machine is shared and noisy: absolute numbers
are secondary). Each benchmark starts its own workers in namespaces of its own and deletes them.
It reports; it does not gate: a missed goal is shown, and only an error makes the exit non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from loadtest.bench_core import BenchResult, print_result, print_summary, summary_rows
from loadtest.bench_env import BenchEnv
from loadtest.bench_families import families_vs_inprocess
from loadtest.bench_footprint import footprint_vs_bare
from loadtest.bench_restart import restart_vs_hot
from loadtest.bench_throughput import pool_vs_inprocess, trivial_vs_raw
from loadtest.bench_updates import p99_during_updates, rss_over_cycles
from loadtest.runner import find_images

Benchmark = Callable[[BenchEnv], Awaitable[BenchResult]]

BENCHMARKS: dict[int, tuple[str, Benchmark]] = {
    1: ("pool vs in-process predict", pool_vs_inprocess),
    2: ("trivial model vs raw aio-pika loop", trivial_vs_raw),
    3: ("p99 during 10 updates + 10 rollbacks", p99_during_updates),
    4: ("RSS over update/cleanup cycles", rss_over_cycles),
    5: ("rolling restart vs hot update", restart_vs_hot),
    6: ("every family: pool vs in-process", families_vs_inprocess),
    7: ("worker footprint vs a bare process", footprint_vs_bare),
}


class BenchSetupError(Exception):
    """The suite cannot start (no zoo, a bad --only)."""


def parse_only(text: str | None) -> list[int]:
    """`1,3` → [1, 3]; None or empty → all, in order."""
    if not text or not text.strip():
        return sorted(BENCHMARKS)
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) not in BENCHMARKS:
            raise BenchSetupError(f"unknown benchmark {part!r}; one of {', '.join(map(str, BENCHMARKS))}")
        if int(part) not in chosen:
            chosen.append(int(part))
    return sorted(chosen)


@dataclass(frozen=True)
class BenchOptions:
    only: list[int]
    quick: bool
    out: Path
    device: str
    url: str
    model_root: Path
    profile: bool = False
    pin: bool = True  # benchmarks 1 and 6: the model on a CPU of its own (BenchEnv.model_cpu)


def check_zoo(model_root: Path) -> list[Path]:
    """The held-out images; raises when the zoo's versions the suite needs are missing."""
    for version in ("1.0.0", "2.0.0"):
        if not (model_root / "shapes" / version / "manifest.json").is_file():
            raise BenchSetupError(f"no shapes/{version} under {model_root}: build the zoo (make zoo)")
    try:
        return find_images(model_root / "_data" / "shapes-heldout" / "images")
    except (OSError, ValueError) as exc:
        raise BenchSetupError(f"no held-out images: {exc}") from exc


def bench_document(results: list[BenchResult], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything the run measured, as `bench.json` holds it."""
    return {
        **meta,
        "errors": sum(r.error is not None for r in results),
        "missed": [f"{r['benchmark']}: {r['measured']}" for r in summary_rows(results) if r["passed"] is False],
        "summary": summary_rows(results),
        "benchmarks": [r.to_json() for r in results],
    }


async def run_bench(options: BenchOptions, console: Console) -> list[BenchResult]:
    images = check_zoo(options.model_root)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    run_id = uuid.uuid4().hex[:6]
    env = BenchEnv(url=options.url, model_root=options.model_root.resolve(), out=options.out.resolve(),
                   device=options.device, quick=options.quick, console=console, run_id=run_id, images=images,
                   profile=options.profile, pin=options.pin)
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / "bench.json"
    meta: dict[str, Any] = {
        "run_id": run_id, "started_at": datetime.now(UTC).isoformat(), "quick": options.quick,
        "device": options.device, "only": options.only, "profile": options.profile,
        "model_cpu": env.model_cpu, "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
    }
    results: list[BenchResult] = []
    console.print(f"bench {run_id}: {', '.join(map(str, options.only))}"
                  f"{' (quick)' if options.quick else ''} on {options.device}; worker logs in {env.out / 'logs'}")
    for number in options.only:
        title, benchmark = BENCHMARKS[number]
        console.rule(f"bench {number}: {title}")
        started = time.monotonic()
        try:
            result = await benchmark(env)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            result = BenchResult(number, title, error=f"{type(exc).__name__}: {exc}")
        result.seconds = time.monotonic() - started
        results.append(result)
        print_result(result, console)
        meta["load_average_at_end"] = os.getloadavg()
        path.write_text(json.dumps(bench_document(results, meta), indent=2, default=str) + "\n")
    console.rule("summary")
    print_summary(results, console)
    console.print(f"figures: {path}")
    return results
