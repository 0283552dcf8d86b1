"""One load-test run end to end: keys and workers (when asked), load + scenario, report, cleanup.

When the harness starts workers itself they get a private namespace (unless one is given),
the model root, keys made in a temporary directory (the control public key derived from the
signing key, when one is given) and a fast heartbeat; they are stopped with SIGTERM at the end and, for a private
namespace, its queues and exchanges are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from control.client import Client
from control.processes import WorkerProcess
from loadtest.records import Accountant, Check
from loadtest.report import build_report, print_report, write_files
from loadtest.runner import LoadShape, Runner
from loadtest.scenarios import BrokerScope, ScenarioContext, ScenarioError, scenario
from schemas.signing import Signer, Verifier, generate_keys
from schemas.topology import Topology
from worker.connections import connect


@dataclass
class HarnessConfig:
    scenario: str
    shape: LoadShape
    url: str  # one broker, or a cluster's nodes comma separated: the client and workers fail over
    out: Path
    namespace: str | None = None  # None: "hotswap", or a private one when the harness starts workers
    workers: int = 0  # workers to start; 0: use the ones running
    model_root: Path = Path("models")
    key: Path | None = None  # private signing key for control commands
    worker_key: Path | None = None  # public key of running workers' status events (default: beside key)
    versions: tuple[str, str] | None = None  # the two versions update/rollback/ab move between
    updates: int = 2
    weights: dict[str, float] | None = None
    command_timeout_s: float = 120.0
    broker_scope: BrokerScope = "restart"
    show_progress: bool = True
    worker_timeout_s: float = 180.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


@dataclass
class Outcome:
    report: dict[str, Any]
    files: dict[str, Path]

    @property
    def exit_code(self) -> int:
        return 0 if self.report["passed"] else 1


def release_versions(model_root: Path, model: str) -> tuple[str, str] | None:
    """The two newest release versions (no `-suffix`) in the model repository, oldest first."""
    directory = model_root / model
    if not directory.is_dir():
        return None

    def key(name: str) -> tuple[int, ...]:
        return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))

    releases = sorted((p.name for p in directory.iterdir() if p.is_dir() and "-" not in p.name
                       and not p.name.startswith(".")), key=key)
    return (releases[-2], releases[-1]) if len(releases) >= 2 else None


def _public_key_of(private: Path, directory: Path) -> Path:
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    public = directory / "control.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return public


@dataclass(frozen=True)
class _Keys:
    signer: Signer | None = None
    control_public: Path | None = None  # for the workers the harness starts
    workers: Verifier | None = None  # verifies the status events of the workers the run drives


def _keys(config: HarnessConfig, temp: Path) -> _Keys:
    """Workers started here get keys made here (the signing key may be the caller's); workers
    already running are followed with the caller's worker.pub."""
    if config.workers:
        files = generate_keys(temp)
        signer = Signer.from_file(config.key or files.control_key)
        public = _public_key_of(config.key, temp) if config.key else files.control_public
        return _Keys(signer, public, Verifier.from_file(files.worker_public))
    if config.key is None:
        return _Keys()
    worker_public = config.worker_key or config.key.parent / "worker.pub"
    workers = Verifier.from_file(worker_public) if worker_public.is_file() else None
    return _Keys(Signer.from_file(config.key), None, workers)


async def run_harness(config: HarnessConfig, console: Console) -> Outcome:
    chosen = scenario(config.scenario)
    if chosen.min_workers and config.workers < chosen.min_workers:
        raise ScenarioError(f"{chosen.name} needs the harness to start workers: --workers {chosen.min_workers} or more")
    versions = config.versions or release_versions(config.model_root, config.shape.model)
    if chosen.uses_control and versions is None:
        raise ScenarioError(f"{chosen.name} moves between two versions: give --versions A,B")
    private_namespace = config.workers > 0 and config.namespace is None
    namespace = config.namespace or (f"loadtest-{config.run_id}" if private_namespace else "hotswap")
    client_name = f"hotswap-loadtest {config.run_id}"
    workers: list[WorkerProcess] = []
    with tempfile.TemporaryDirectory(prefix="hotswap-loadtest-") as temp:
        keys = _keys(config, Path(temp))
        try:
            if config.workers:
                spec = f"{config.shape.model}@{versions[0]}" if versions else config.shape.model
                workers = await _start_workers(config, namespace, spec, keys.control_public, console)
            ctx = ScenarioContext(
                url=config.url, namespace=namespace, model=config.shape.model, accountant=Accountant(),
                progress=lambda: 0.0, versions=versions or ("", ""), signer=keys.signer,
                worker_verifier=keys.workers, workers=workers,
                connection_names=[client_name, *(f"hotswap-worker {w.env['HOTSWAP_WORKER_ID']}" for w in workers)],
                updates=config.updates, weights=config.weights, command_timeout_s=config.command_timeout_s,
                settle_s=1.2 if workers else 2.5, broker_scope=config.broker_scope,
            )
            return await _run(config, chosen_name=chosen.name, ctx=ctx, client_name=client_name,
                              namespace=namespace, console=console)
        finally:
            for worker in workers:
                code = await asyncio.to_thread(worker.stop, 30.0)
                console.print(f"[dim]worker {worker.env['HOTSWAP_WORKER_ID']} stopped ({code}); "
                              f"log {worker.log_path}[/dim]")
            if private_namespace:
                await delete_namespace(config.url, namespace, config.shape.model)


async def _run(config: HarnessConfig, *, chosen_name: str, ctx: ScenarioContext, client_name: str,
               namespace: str, console: Console) -> Outcome:
    chosen = scenario(chosen_name)
    accountant = ctx.accountant
    async with Client(config.url, namespace=namespace, observer=accountant.received,
                      connection_name=client_name, reply_queue_ttl_s=300) as client:
        runner = Runner(client, accountant, config.shape, console=console, show_progress=config.show_progress,
                        run_id=config.run_id)
        ctx.progress = runner.progress
        wall = datetime.now(UTC)
        prepared_at = time.monotonic()
        try:
            await chosen.prepare(ctx)
            during = asyncio.create_task(chosen.during(ctx))
            failed_step: list[Check] = []
            try:
                await runner.run()
                await during  # a command still being applied is followed to its outcome
            except Exception as exc:  # the scenario's step broke; the load's accounting still stands
                if not during.done() or during.cancelled() or during.exception() is not exc:
                    raise
                ctx.mark(f"scenario step failed: {exc}", kind="fault", ok=False)
                failed_step.append(Check(f"{chosen.name} steps", False, f"{type(exc).__name__}: {exc}"))
            finally:
                during.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await during
            await runner.drain()
            checks = [*failed_step, *await chosen.finish(ctx)]
        finally:
            if ctx.operator is not None:
                await ctx.operator.__aexit__(None, None, None)
        assert runner.started_at is not None and runner.stopped_at is not None
        run = {
            "run_id": config.run_id, "scenario": chosen.name, "model": config.shape.model, "namespace": namespace,
            "loop": config.shape.loop, "rate": config.shape.rate, "concurrency": config.shape.concurrency,
            "duration_s": config.shape.duration_s, "jobs": config.shape.jobs, "arrival": config.shape.arrival,
            "deadline_s": config.shape.deadline_s, "grace_s": config.shape.grace_s,
            "images": len(config.shape.images), "workers_started": [w.env["HOTSWAP_WORKER_ID"] for w in ctx.workers],
            "versions": list(ctx.versions), "prepare_seconds": round(runner.started_at - prepared_at, 3),
            "started_at": wall.isoformat(), "republished": client.republished,
            "stopped_early": "no queue for the model: no worker serves it here" if runner.no_route else None,
        }
        if runner.no_route:
            console.print(f"[red]no queue is bound for {config.shape.model!r} in namespace {namespace!r}: "
                          "no worker serves it; the load stopped[/red]")
    report = build_report(accountant, started_at=runner.started_at, stopped_at=runner.stopped_at,
                          events=ctx.events, checks=checks, run=run)
    files = write_files(report, accountant, runner.started_at, config.out)
    print_report(report, console)
    return Outcome(report, files)


async def _start_workers(config: HarnessConfig, namespace: str, spec: str, public: Path | None,
                         console: Console) -> list[WorkerProcess]:
    workers = [
        WorkerProcess(
            models=[spec],
            log_path=config.out / f"worker-{i}.log",
            env={
                "HOTSWAP_AMQP_URL": config.url,
                "HOTSWAP_NAMESPACE": namespace,
                "HOTSWAP_MODEL_ROOT": str(config.model_root.resolve()),
                "HOTSWAP_WORKER_ID": f"lt-{config.run_id}-{i}",
                "HOTSWAP_HEARTBEAT_INTERVAL_S": "0.5",
                **({"HOTSWAP_CONTROL_PUBLIC_KEY": str(public)} if public else {}),
            },
        )
        for i in range(1, config.workers + 1)
    ]
    console.print(f"starting {len(workers)} worker(s) ({spec}) in namespace {namespace} …")
    started = await asyncio.gather(*(asyncio.to_thread(w.start, config.worker_timeout_s) for w in workers),
                                   return_exceptions=True)
    failures = [r for r in started if isinstance(r, BaseException)]
    if failures:
        for worker in workers:
            await asyncio.to_thread(worker.stop, 10.0)
        raise ScenarioError(f"a worker did not start: {failures[0]}")
    for worker in workers:
        console.print(f"  {worker.env['HOTSWAP_WORKER_ID']} ready at {worker.url}")
    return workers


async def delete_namespace(url: str, namespace: str, model: str) -> None:
    """Delete what a private namespace declared (its queues, the control log, its exchanges)."""
    topology = Topology(namespace)
    queues = [topology.job_queue(model), topology.dead_letter_queue(model), topology.control_log]
    exchanges = [topology.jobs_exchange, topology.dead_letter_exchange, topology.control_exchange,
                 topology.status_exchange]
    with contextlib.suppress(Exception):  # tidying up; never the reason a run fails
        connection = await connect(url, "hotswap-loadtest cleanup", attempts=1)
        async with connection:
            for name in queues:
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                    await channel.queue_delete(name)
            for name in exchanges:
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                    await channel.exchange_delete(name)
