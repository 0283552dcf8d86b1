"""Benchmark 5: moving two loaded workers to a new version, the traditional way and hot.

(a) Rolling restart: each worker in turn gets SIGTERM (it finishes and acks what it holds),
    exits, and starts again with `--model shapes@2.0.0`; the next waits until it is ready.
(b) Hot update: one signed `update` through the control plane, followed to "done".

Both under the same open-loop load (70 % of two workers' capacity); each reports failed and lost
jobs and the latency spike: the worst p99 of the 1-s buckets from the change's start to 2 s after
its end, against the p99 before the change.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.operator import Operator
from control.processes import WorkerProcess
from loadtest.bench_core import BenchResult, Goal, Metric, latency_spike, ratio
from loadtest.bench_env import BenchEnv, LoadRun, open_loop, run_load, warm_up
from loadtest.bench_updates import COMMAND_TIMEOUT_S, LOAD_SHARE, MODEL, NEW, OLD, SETTLE_S, measure_capacity
from loadtest.records import ControlEvent
from loadtest.runner import Runner
from schemas.control import Update
from schemas.signing import Signer, Verifier, generate_keys

AFTER_S = 2.0  # past the change's end that still counts as the change (a backlog drains)


@dataclass
class Change:
    label: str
    run: LoadRun
    started: float
    ended: float
    ok: bool
    detail: str

    def row(self, rate: float) -> dict[str, Any]:
        spike = latency_spike(self.run.records, self.run.started_at, self.started, self.ended,
                              steady_from=self.run.started_at + 1.0, after_s=AFTER_S)
        after = Counter(r.version for r in self.run.records
                        if r.answered_at is not None and r.submitted_at > self.ended)
        return {
            "way": self.label, "offered jobs/s": rate, "change s": self.ended - self.started,
            "jobs": self.run.report["summary"]["submitted"], "failed": self.run.failed, "lost": self.run.lost,
            "steady p99 ms": spike.steady_p99_ms, "worst 1-s p99 ms": spike.worst_bucket_p99_ms,
            "spike ×": spike.ratio, "steady worst 1-s p99 ms": spike.steady_worst_bucket_p99_ms,
            "worst 1-s p99 / steady worst 1-s p99": spike.bucket_ratio,
            "machine CPU busy": None if self.run.machine_busy is None else f"{self.run.machine_busy:.0%}",
            "versions after": ", ".join(f"{v}: {n}" for v, n in sorted(after.items(),
                                                                                             key=str)),
        }


async def _under_load(env: BenchEnv, namespace: str, rate: float, label: str,
                      change: Any) -> Change:
    """Steady load, then `change()` (returns ok, detail) while the load goes on, then a tail."""
    steady_s = tail_s = 5.0 if env.quick else 10.0
    marks: dict[str, Any] = {}

    async def beside(runner: Runner, events: list[ControlEvent]) -> None:
        await asyncio.sleep(steady_s)
        marks["started"] = time.monotonic()
        events.append(ControlEvent(marks["started"], f"{label} starts"))
        marks["ok"], marks["detail"] = await change(events)
        marks["ended"] = time.monotonic()
        events.append(ControlEvent(marks["ended"], f"{label} done", ok=marks["ok"]))
        await asyncio.sleep(tail_s)
        runner.stop()

    run = await run_load(env, namespace, open_loop(env, MODEL, rate, 900.0, seed=2), beside=beside, tag=label)
    return Change(label, run, marks["started"], marks["ended"], marks["ok"], marks["detail"])


async def rolling_restart(env: BenchEnv, rate: float | None) -> tuple[Change, float]:
    namespace = env.namespace("restart")
    workers = [env.worker(namespace, f"w{i}", [f"{MODEL}@{OLD}"]) for i in (1, 2)]
    await env.start(*workers)
    try:
        await warm_up(env, namespace, MODEL)
        rate = rate or LOAD_SHARE * await measure_capacity(env, namespace)

        async def restart_each(events: list[ControlEvent]) -> tuple[bool, str]:
            for i, worker in enumerate(list(workers)):
                workers[i] = await env.restart(worker, [f"{MODEL}@{NEW}"])
                events.append(ControlEvent(time.monotonic(), f"{worker.env['HOTSWAP_WORKER_ID']} back on {NEW}"))
            return True, "both workers restarted on " + NEW

        change = await _under_load(env, namespace, rate, "rolling restart", restart_each)
    finally:
        await env.stop(*workers)
        await env.cleanup(namespace, MODEL)
    return change, rate


async def hot_update(env: BenchEnv, rate: float) -> Change:
    namespace = env.namespace("hot")
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-") as temp:
        keys = generate_keys(Path(temp))
        workers: list[WorkerProcess] = [
            env.worker(namespace, f"w{i}", [f"{MODEL}@{OLD}"], public_key=keys.control_public) for i in (1, 2)
        ]
        await env.start(*workers)
        try:
            await warm_up(env, namespace, MODEL)
            async with Operator(env.url, namespace=namespace, signer=Signer.from_file(keys.control_key), issuer="bench",
                                workers=Verifier.from_file(keys.worker_public)) as op:
                await op.heartbeats(listen_s=SETTLE_S)  # the status exchange is bound before the change

                async def update(events: list[ControlEvent]) -> tuple[bool, str]:
                    report = await op.publish_and_wait(MODEL, Update(version=NEW), timeout_s=COMMAND_TIMEOUT_S,
                                                       settle_s=SETTLE_S)
                    if len(report.workers) != len(workers):
                        return False, f"heard from {len(report.workers)} of {len(workers)} workers"
                    return report.ok, "done on every worker" if report.ok else str(report.failures or report.missing)

                return await _under_load(env, namespace, rate, "hot update", update)
        finally:
            await env.stop(*workers)
            await env.cleanup(namespace, MODEL)


async def restart_vs_hot(env: BenchEnv) -> BenchResult:
    result = BenchResult(5, "rolling restart vs hot update")
    rate = LOAD_SHARE * env.capacity if env.capacity else None
    restart, rate = await rolling_restart(env, rate)
    hot = await hot_update(env, rate)
    rows = [restart.row(rate), hot.row(rate)]
    result.rows = rows
    for change, row in zip((restart, hot), rows, strict=True):
        result.metrics += [
            Metric(f"{change.label}: failed jobs", change.run.failed, Goal("==", 0)),
            Metric(f"{change.label}: lost jobs", change.run.lost, Goal("==", 0)),
            Metric(f"{change.label}: latency spike (worst 1-s p99 / steady p99)", row["spike ×"],
                   Goal("<=", 1.5) if change.label.startswith("hot") else None),
            # For reference (no goal): the same statistic without a change, this run's noise floor.
            Metric(f"{change.label}: worst 1-s p99 / the steady part's worst 1-s p99",
                   row["worst 1-s p99 / steady worst 1-s p99"]),
        ]
        if not change.ok:
            result.metrics.append(Metric(f"{change.label}: completed", 0, Goal("==", 1)))
            result.notes.append(f"{change.label} did not complete: {change.detail}")
    result.metrics.append(Metric("spike(rolling restart) / spike(hot update)", ratio(rows[0]["spike ×"],
                                                                                    rows[1]["spike ×"])))
    result.figures = {"rate": rate, "capacity_jobs_per_s": env.capacity, "after_s": AFTER_S,
                      **{c.label: {"summary": c.run.report["summary"], "events": c.run.report["events"],
                                   "timeline": c.run.report["timeline"], "detail": c.detail} for c in (restart, hot)}}
    result.notes.append(f"change window: from its start to {AFTER_S:g} s after its end; steady: the jobs "
                        "answered before it (the first second left out); the steady part's worst 1-s p99 is "
                        "the same statistic over its whole buckets, where nothing changed (a reference, no goal)")
    return result
