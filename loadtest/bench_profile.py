"""The bench's profile mode (`hotswap loadtest bench --profile`): where a worker's CPU per job goes.

A profiled worker (`HOTSWAP_PROFILE=1`) times its steps in thread CPU and wall time and serves the
totals on `/profile` (`worker.runtime.profiling`). The bench reads them before and after a measured
run and prints microseconds of CPU per answered job: each step in the thread it ran in, and for
each thread what it spent outside every step (on the loop: asyncio, aio-pika and aiormq, that is
the transport, the hand-offs to threads and scheduling). The raw loop of benchmark 2 spends all of
its CPU in that last kind of work, so the two lines compare directly. Each thread's `(waited inside
steps)` is wall time, not CPU: inside its steps, how long it was off its CPU per job, waiting for a
core or the GIL (for an inference thread on a CPU of its own, the GIL).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from control.processes import WorkerProcess

Profile = dict[str, Any]


def read_profile(worker: WorkerProcess) -> Profile:
    profile: Profile = json.loads(worker.text("/profile"))
    if not profile.get("enabled"):
        raise RuntimeError(f"{worker.url}/profile: the worker does not profile (HOTSWAP_PROFILE unset)")
    return profile


def per_job(before: Profile, after: Profile, jobs: int) -> dict[str, float]:
    """µs of CPU per job by `thread/step` over the window, and `thread/(outside steps)` for the rest
    of each thread's CPU; `thread/(all)` is the thread's total; `thread/(waited inside steps)` the
    wall time its steps took beyond their CPU."""
    jobs = max(jobs, 1)
    rows: dict[str, float] = {}
    steps_by_thread: dict[str, float] = {}
    waited_by_thread: dict[str, float] = {}
    for key, figures in after["steps"].items():
        earlier = before["steps"].get(key, {"cpu_s": 0.0, "wall_s": 0.0, "count": 0})
        if figures["count"] == earlier["count"]:
            continue  # not run in this window (the control thread's validation before it)
        cpu = figures["cpu_s"] - earlier["cpu_s"]
        rows[key] = 1e6 * cpu / jobs
        thread = key.split("/", 1)[0]
        steps_by_thread[thread] = steps_by_thread.get(thread, 0.0) + rows[key]
        waited = figures["wall_s"] - earlier["wall_s"] - cpu
        waited_by_thread[thread] = waited_by_thread.get(thread, 0.0) + 1e6 * max(waited, 0.0) / jobs
    for thread, total in after["threads"].items():
        spent = 1e6 * (total - before["threads"].get(thread, 0.0)) / jobs
        if spent < 0.5 and thread not in steps_by_thread:
            continue  # a thread this window did not use (the control thread when nothing changes)
        rows[f"{thread}/(all)"] = spent
        rows[f"{thread}/(outside steps)"] = spent - steps_by_thread.get(thread, 0.0)
        if thread in waited_by_thread:
            rows[f"{thread}/(waited inside steps)"] = waited_by_thread[thread]
    return dict(sorted(rows.items()))


def mean_profile(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for run in runs for key in run})
    return {key: sum(run.get(key, 0.0) for run in runs) / len(runs) for key in keys}


def print_profiles(profiles: dict[str, dict[str, float]], console: Console) -> None:
    """One column per profiled series, one row per `thread/step`."""
    table = Table(title="profile: CPU µs per job by thread and step ((waited inside steps): wall µs off the CPU)",
                  title_justify="left")
    table.add_column("thread/step")
    for label in profiles:
        table.add_column(label, justify="right")
    keys = sorted({key for profile in profiles.values() for key in profile})
    for key in keys:
        table.add_row(key, *(f"{profile[key]:.1f}" if key in profile else "-" for profile in profiles.values()))
    console.print(table)
