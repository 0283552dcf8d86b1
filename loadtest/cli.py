"""`hotswap loadtest run`: load, a scenario, exact accounting, a report. Exits 1 on any lost or
failed job (or failed scenario check), 2 when the run cannot start. `hotswap loadtest bench`: the
performance benchmarks (`loadtest/bench.py`). `hotswap loadtest fleet-bounds`: what bounds a fleet
(`loadtest/bench_fleet.py`).

Only cheap imports here: `hotswap --help` must not pay for aio-pika or matplotlib.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Load-test the workers: steady load, hot updates, faults; exact accounting.",
                  no_args_is_help=True)


class ScenarioName(StrEnum):
    steady = "steady"
    update = "update"
    rollback = "rollback"
    ab = "ab"
    kill_worker = "kill-worker"
    broker_restart = "broker-restart"


class Arrival(StrEnum):
    poisson = "poisson"
    fixed = "fixed"


class BrokerScope(StrEnum):
    run = "run"
    all = "all"
    restart = "restart"


def _weights(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        return {v.strip(): float(w) for v, _, w in (part.partition("=") for part in text.split(","))}
    except ValueError as exc:
        raise typer.BadParameter(f"weights look like 1.0.0=70,2.0.0=30 ({exc})") from exc


def _versions(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != 2:
        raise typer.BadParameter("--versions is two versions: FROM,TO (e.g. 1.0.0,2.0.0)")
    return parts[0], parts[1]


@app.command()
def run(
    scenario: Annotated[ScenarioName, typer.Option(help="what happens while the load runs")] = ScenarioName.steady,
    model: Annotated[str, typer.Option("--model", "-m", help="model to load-test")] = "shapes",
    rate: Annotated[float | None, typer.Option(help="open loop: jobs per second")] = None,
    concurrency: Annotated[int | None, typer.Option(help="closed loop: jobs in flight (default 4)")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds of load (default 10 without --jobs)")] = None,
    jobs: Annotated[int | None, typer.Option(help="number of jobs (stops at whichever comes first)")] = None,
    images: Annotated[Path | None, typer.Option(help="directory of images (default: the held-out set)")] = None,
    workers: Annotated[int, typer.Option(help="start this many workers (0: use the running ones)")] = 0,
    out: Annotated[Path | None, typer.Option(help="report directory (default out/loadtest/<time>-<scenario>)")] = None,
    amqp_url: Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="AMQP URL of the broker")] = None,
    namespace: Annotated[str | None, typer.Option(
        envvar="HOTSWAP_NAMESPACE", help="default: hotswap, or a private one with --workers")] = None,
    model_root: Annotated[Path, typer.Option(envvar="HOTSWAP_MODEL_ROOT", help="model repository")] = Path("models"),
    key: Annotated[Path | None, typer.Option(
        "--key", envvar="HOTSWAP_CONTROL_KEY", help="private signing key (generated with --workers if absent)")] = None,
    worker_key: Annotated[Path | None, typer.Option(
        "--worker-key", envvar="HOTSWAP_WORKER_PUBLIC_KEY",
        help="public key of the running workers' status events (default: worker.pub beside --key)")] = None,
    versions: Annotated[str | None, typer.Option(help="FROM,TO for update/rollback/ab (default: the two newest)")]
    = None,
    updates: Annotated[int, typer.Option(min=1, help="updates (update) or update+rollback pairs (rollback)")] = 2,
    weights: Annotated[str | None, typer.Option(help="ab: VERSION=PERCENT,... (default 50/50)")] = None,
    arrival: Annotated[Arrival, typer.Option(help="open loop: arrival process")] = Arrival.poisson,
    deadline: Annotated[float | None, typer.Option(help="each job's deadline in seconds (`expired` after)")] = None,
    job_timeout: Annotated[float, typer.Option(help="closed loop: seconds a lane waits for a result")] = 30.0,
    grace: Annotated[float, typer.Option(help="seconds to wait for results still out after the load")] = 10.0,
    broker_scope: Annotated[BrokerScope, typer.Option(
        help="broker-restart: restart the broker application (stop_app, start_app), or only close "
             "this run's connections (run) or all the broker's (all)")] = BrokerScope.restart,
    command_timeout: Annotated[float, typer.Option(help="seconds to wait for each control command")] = 120.0,
    seed: Annotated[int, typer.Option(help="seed of the Poisson arrivals")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Run a load test and write report.json, jobs.jsonl and timeline.png."""
    import asyncio
    import logging
    import time

    from rich.console import Console

    from control.client import DEFAULT_AMQP_URL
    from loadtest.harness import HarnessConfig, run_harness
    from loadtest.runner import LoadShape, find_images
    from loadtest.scenarios import ScenarioError

    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)  # reconnect noise in fault scenarios
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    console = Console()
    image_dir = images or model_root / "_data" / f"{model}-heldout" / "images"
    try:
        shape = LoadShape(
            model=model, images=find_images(image_dir), rate=rate, concurrency=concurrency, duration_s=duration,
            jobs=jobs, arrival="fixed" if arrival is Arrival.fixed else "poisson", deadline_s=deadline,
            job_timeout_s=job_timeout, grace_s=grace, seed=seed,
        )
    except (OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    config = HarnessConfig(
        scenario=scenario.value, shape=shape, url=amqp_url or os.environ.get("HOTSWAP_AMQP_URL", DEFAULT_AMQP_URL),
        out=out or Path("out") / "loadtest" / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario.value}",
        namespace=namespace, workers=workers, model_root=model_root, key=key, worker_key=worker_key,
        versions=_versions(versions),
        updates=updates, weights=_weights(weights), command_timeout_s=command_timeout,
        broker_scope=broker_scope.value, show_progress=progress,
    )
    try:
        outcome = asyncio.run(run_harness(config, console))
    except ScenarioError as exc:
        console.print(f"[red]cannot run {scenario.value}: {exc}[/red]")
        raise typer.Exit(2) from exc
    raise typer.Exit(outcome.exit_code)


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def bench(
    only: Annotated[str | None, typer.Option(help="benchmarks to run, e.g. 1,3 (default: all)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="shorter runs: the whole suite in a few minutes")] = False,
    out: Annotated[Path, typer.Option(help="where bench.json and the worker logs go")] = Path("out/bench"),
    device: Annotated[Device, typer.Option(help="where workers and the in-process baseline run")] = Device.cpu,
    amqp_url: Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="AMQP URL of the broker")] = None,
    model_root: Annotated[Path, typer.Option(envvar="HOTSWAP_MODEL_ROOT", help="model repository")] = Path("models"),
    profile: Annotated[bool, typer.Option("--profile", help=(
        "workers time their steps: benchmarks 1 and 2 also print CPU µs per job by thread and step"))] = False,
    share_cpus: Annotated[bool, typer.Option("--share-cpus", help=(
        "benchmarks 1 and 6 pin nothing (default: the model on a CPU of its own on both sides, the load "
        "generator off it)"))] = False,
) -> None:
    """The performance benchmarks (docs/architecture.md, "Targets"): ratios measured side by side, a summary
    table and bench.json. A missed goal is reported, not an error: exits non-zero only on errors."""
    import asyncio

    from rich.console import Console

    from control.client import DEFAULT_AMQP_URL
    from loadtest.bench import BenchOptions, BenchSetupError, check_zoo, parse_only, run_bench

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: wide enough for the tables
        console = Console(width=160)
    try:
        options = BenchOptions(
            only=parse_only(only), quick=quick, out=out, device=device.value, model_root=model_root,
            url=amqp_url or os.environ.get("HOTSWAP_AMQP_URL", DEFAULT_AMQP_URL), profile=profile,
            pin=not share_cpus,
        )
        check_zoo(model_root)
    except BenchSetupError as exc:
        console.print(f"[red]cannot run the benchmarks: {exc}[/red]")
        raise typer.Exit(2) from exc
    results = asyncio.run(run_bench(options, console))
    raise typer.Exit(1 if any(r.error is not None for r in results) else 0)


@app.command("fleet-bounds")
def fleet_bounds(
    quick: Annotated[bool, typer.Option("--quick", help="a smoke run of every step, in seconds")] = False,
    cluster_url: Annotated[str | None, typer.Option(
        help="a 3-node cluster's HOTSWAP_AMQP_URL (hotswap cluster start): adds a quorum queue on 3 nodes")] = None,
    workers: Annotated[int, typer.Option(min=1, help="the fleet the computed bounds are for")] = 1000,
    worker_jobs_s: Annotated[float, typer.Option(
        help="jobs/s one worker serves (default: shapes on one CPU worker, README Performance)")] = 277.0,
    heartbeat_s: Annotated[float, typer.Option(help="the workers' HOTSWAP_HEARTBEAT_INTERVAL_S")] = 2.0,
    out: Annotated[Path, typer.Option(help="where fleet.json goes")] = Path("out/fleet"),
    amqp_url: Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="AMQP URL of the broker")] = None,
) -> None:
    """What bounds a fleet: one queue's jobs/s and MB/s by body size, the control log's size and
    replay, status fan-out, broker memory per worker; then workers per queue, when to shard and
    what a thousand workers ask of the broker (measured and computed figures, marked)."""
    import asyncio
    import logging

    from rich.console import Console

    from control.client import DEFAULT_AMQP_URL
    from loadtest.bench_fleet import FleetOptions, run_fleet_bounds
    from loadtest.fleet_bounds import Assumptions

    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    console = Console() if Console().is_terminal else Console(width=200)  # a pipe: wide enough for the tables
    options = FleetOptions(
        url=amqp_url or os.environ.get("HOTSWAP_AMQP_URL", DEFAULT_AMQP_URL), quick=quick, cluster_url=cluster_url,
        out=out, assumptions=Assumptions(worker_jobs_s=worker_jobs_s, heartbeat_s=heartbeat_s, workers=workers),
    )
    measured = asyncio.run(run_fleet_bounds(options, console))
    raise typer.Exit(1 if measured.errors else 0)
