"""`hotswap worker` (and `python -m worker`): serve image jobs until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from worker.logs import LogFormat, configure_logging  # the stdlib only: `hotswap --help` stays light

console = Console()
AmqpUrl = Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="broker URL(s), comma separated")]


def _configure_logging(verbose: bool, log_format: LogFormat, worker_id: str) -> None:
    configure_logging(log_format, level=logging.DEBUG if verbose else logging.INFO, static={"worker_id": worker_id})


def worker(
    model: Annotated[list[str], typer.Option("--model", "-m", help="MODEL or MODEL@VERSION; repeatable")],
    model_root: Annotated[Path | None, typer.Option(help="model repository root")] = None,
    amqp_url: AmqpUrl = None,
    namespace: Annotated[str | None, typer.Option(help="prefix of exchange and queue names")] = None,
    status_port: Annotated[int | None, typer.Option(help="status/metrics port; 0 picks a free one")] = None,
    status_host: Annotated[str | None, typer.Option()] = None,
    prefetch: Annotated[int | None, typer.Option(help="unacked jobs this worker holds")] = None,
    torch_threads: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ...")] = None,
    grace_period: Annotated[float | None, typer.Option(help="seconds to finish in-flight jobs on SIGTERM")] = None,
    worker_id: Annotated[str | None, typer.Option()] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve image jobs for the given models until SIGTERM or SIGINT."""
    from worker.app import EXIT_HUNG, Worker, WorkerKeyMissing
    from worker.config import WorkerSettings
    from worker.cpus import CpuPlanError
    from worker.runtime.manager import LoadFailed

    flags: dict[str, Any] = {
        "models": model, "model_root": model_root, "amqp_url": amqp_url, "namespace": namespace,
        "status_port": status_port, "status_host": status_host, "prefetch": prefetch,
        "torch_threads": torch_threads, "device": device, "grace_period_s": grace_period,
        "worker_id": worker_id,
    }
    settings = WorkerSettings(**{k: v for k, v in flags.items() if v is not None})
    _configure_logging(verbose, settings.log_format, settings.worker_id)
    try:
        serving = Worker(settings)
    except CpuPlanError as exc:
        console.print(f"[red]cannot start: {exc}[/red]")
        raise typer.Exit(2) from exc
    try:
        asyncio.run(serving.run())
    except (LoadFailed, WorkerKeyMissing) as exc:
        console.print(f"[red]cannot start: {exc}[/red]")
        raise typer.Exit(2) from exc
    if serving.hung is not None:
        # The inference thread is stuck for good: an ordinary exit would wait for it forever.
        logging.shutdown()
        os._exit(EXIT_HUNG)
