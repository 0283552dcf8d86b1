"""`hotswap`: run workers, submit images, build the demo zoo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from control import commands
from loadtest.cli import app as loadtest_app
from schemas.jobs import InferenceParams, Job, JobResult

app = typer.Typer(help="Serve vision models from RabbitMQ and change them while they serve.", no_args_is_help=True)
zoo_app = typer.Typer(help="The demo model zoo, trained locally.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(commands.keys_app, name="keys")
app.add_typer(loadtest_app, name="loadtest")
for _command in (commands.update, commands.rollback, commands.traffic, commands.unload, commands.status,
                 commands.watch):
    app.command()(_command)
console = Console()

AmqpUrl = Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="AMQP URL of the broker")]
Namespace = Annotated[str, typer.Option(envvar="HOTSWAP_NAMESPACE", help="prefix of exchange and queue names")]


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)


@app.command()
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
    from worker.runtime.manager import LoadFailed

    _configure_logging(verbose)
    flags: dict[str, Any] = {
        "models": model, "model_root": model_root, "amqp_url": amqp_url, "namespace": namespace,
        "status_port": status_port, "status_host": status_host, "prefetch": prefetch,
        "torch_threads": torch_threads, "device": device, "grace_period_s": grace_period,
        "worker_id": worker_id,
    }
    settings = WorkerSettings(**{k: v for k, v in flags.items() if v is not None})
    serving = Worker(settings)
    try:
        asyncio.run(serving.run())
    except (LoadFailed, WorkerKeyMissing) as exc:
        console.print(f"[red]cannot start: {exc}[/red]")
        raise typer.Exit(2) from exc
    if serving.hung is not None:
        # The inference thread is stuck for good: an ordinary exit would wait for it forever.
        logging.shutdown()
        os._exit(EXIT_HUNG)


@app.command()
def submit(
    images: Annotated[list[str], typer.Argument(help="image files, or http(s)/file URLs")],
    model: Annotated[str, typer.Option("--model", "-m")],
    version: Annotated[str | None, typer.Option(help="pin a version")] = None,
    conf: Annotated[float, typer.Option(min=0, max=1)] = 0.25,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each result")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON result per line")] = False,
    annotate: Annotated[Path | None, typer.Option(help="save images with boxes drawn here")] = None,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = "hotswap",
) -> None:
    """Submit images and print their detections."""
    from control.client import Client

    async def run() -> list[JobResult]:
        async with Client(amqp_url, namespace=namespace, timeout_s=timeout) as client:
            params = InferenceParams(conf=conf)
            return await asyncio.gather(
                *(client.submit(image, model=model, version=version, params=params) for image in images)
            )

    results = asyncio.run(run())
    for image, result in zip(images, results, strict=True):
        if as_json:
            print(result.model_dump_json(exclude_none=True))
        else:
            print_result(image, result)
        if annotate is not None and result.status == "ok" and not image.startswith(("http", "file:")):
            from control.annotate import draw_detections

            out = draw_detections(Path(image), result, annotate)
            if not as_json:
                console.print(f"  annotated: {out}")
    if any(r.status != "ok" for r in results):
        raise typer.Exit(1)


def print_result(image: str, result: JobResult) -> None:
    where = f"{result.model}/{result.version or '?'} on {result.worker_id}"
    if result.error is not None:
        console.print(f"[bold]{image}[/bold]: [red]{result.error.code}[/red] {result.error.message} ({where})")
        return
    table = Table(title=f"{image} — {where}, {result.timings.total_ms:.1f} ms", title_justify="left")
    for column in ("class", "score", "x1", "y1", "x2", "y2"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for d in result.detections:
        b = d.box
        table.add_row(d.class_name, f"{d.score:.2f}", *(f"{v:.1f}" for v in (b.x1, b.y1, b.x2, b.y2)))
    if not result.detections:
        table.add_row("(nothing)", "", "", "", "", "")
    console.print(table)


@zoo_app.command("build")
def zoo_build(
    root: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    force: Annotated[bool, typer.Option(help="rebuild versions that already exist")] = False,
    large: Annotated[bool, typer.Option(help="also build MogFace (~342 MB) and M2FP human parsing (~253 MB)")] = False,
) -> None:
    """Train the demo YOLOv8n models on synthetic shapes (offline, about 3 minutes the first time), and
    write the modelscope face detectors (seeded, seconds; --large about a minute more, 600 MB)."""
    from control.zoo import build_zoo

    built = build_zoo(root, force=force, large=large, progress=lambda line: console.print(f"[dim]{line}[/dim]"))
    for path in built:
        console.print(f"[green]ready[/green] {path}")


@app.command()
def schema(
    write: Annotated[bool, typer.Option(help="write schemas/json/*.schema.json instead of printing")] = False,
) -> None:
    """JSON Schemas of the job and the result, for producers in other languages."""
    documents = json_schemas()
    if not write:
        print(json.dumps(documents, indent=2))
        return
    for name, document in documents.items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        path.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {path}")


SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas" / "json"


def json_schemas() -> dict[str, dict[str, Any]]:
    return {"job": Job.model_json_schema(), "result": JobResult.model_json_schema()}


@app.command()
def demo(
    root: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    amqp_url: AmqpUrl = None,
) -> None:
    """Build the zoo if needed, start two workers, submit images, print results and throughput."""
    from control.demo import run_demo

    raise typer.Exit(run_demo(root, amqp_url))


def main() -> None:
    app()
