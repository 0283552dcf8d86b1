"""`hotswap`: run workers, submit images, build the demo zoo."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from control import commands
from control.cluster import cluster_app
from control.rollout_cli import rollout
from schemas.jobs import InferenceParams, JobResult
from worker.cli import worker as worker_command


def _add_command_groups(root: typer.Typer) -> None:
    """Command groups other packages contribute (entry points `hotswap.commands`, e.g. `loadtest`):
    the load tests build on the control plane, so it cannot import them."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="hotswap.commands"):
        root.add_typer(entry.load(), name=entry.name)


app = typer.Typer(help="Serve vision models from RabbitMQ and change them while they serve.", no_args_is_help=True)
zoo_app = typer.Typer(help="The demo model zoo, trained locally.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(commands.keys_app, name="keys")
app.add_typer(cluster_app, name="cluster")
_add_command_groups(app)
app.command("worker")(worker_command)
app.command("rollout")(rollout)
for _command in (commands.update, commands.rollback, commands.traffic, commands.unload, commands.on_demand,
                 commands.status, commands.watch):
    app.command()(_command)
console = Console()

AmqpUrl = Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="broker URL(s), comma separated")]
Namespace = Annotated[str, typer.Option(envvar="HOTSWAP_NAMESPACE", help="prefix of exchange and queue names")]


@app.command()
def submit(
    images: Annotated[list[str], typer.Argument(help="image files, or http(s)/file URLs")],
    model: Annotated[str, typer.Option("--model", "-m")],
    version: Annotated[str | None, typer.Option(help="pin a version")] = None,
    conf: Annotated[float, typer.Option(min=0, max=1)] = 0.25,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each result")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON result per line")] = False,
    annotate: Annotated[Path | None, typer.Option(help=(
        "save each image here with its result drawn: boxes and labels for every task that finds objects, "
        "plus instance masks as overlays (segment), keypoints and skeleton (pose), the five landmarks "
        "(face-detection), part masks with a legend (human-parsing); a classifier's classes are only printed"
    ))] = None,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = "hotswap",
) -> None:
    """Submit images and print what each model found (its task's output as tables)."""
    from control.client import Client

    async def run() -> list[JobResult]:
        async with Client(amqp_url, namespace=namespace, timeout_s=timeout) as client:
            params = InferenceParams(conf=conf)
            return await asyncio.gather(
                *(client.submit(image, model=model, version=version, params=params) for image in images)
            )

    results = asyncio.run(run())
    from control.render import print_result  # numpy and pycocotools, once there is something to show

    for image, result in zip(images, results, strict=True):
        if as_json:
            print(result.model_dump_json(exclude_none=True))
        else:
            print_result(image, result, console)
        if annotate is not None and result.status == "ok" and not image.startswith(("http", "file:")):
            from control.annotate import draw_result

            out = draw_result(Path(image), result, annotate)
            if not as_json:
                console.print(f"  annotated: {out}")
    if any(r.status != "ok" for r in results):
        raise typer.Exit(1)


@zoo_app.command("build")
def zoo_build(
    root: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    force: Annotated[bool, typer.Option(help="rebuild versions that already exist")] = False,
    large: Annotated[bool, typer.Option(help="also build MogFace (~342 MB) and M2FP human parsing (~253 MB)")] = False,
) -> None:
    """Train the demo YOLOv8n models on synthetic shapes (offline, about 5 minutes on two cores the first
    time), and write the modelscope face detectors (seeded, seconds; --large about a minute more, 600 MB)."""
    import time

    from control.zoo import build_zoo

    started = time.monotonic()

    def say(line: str) -> None:  # with the time since the start: where a build's minutes go
        console.print(f"[dim]{time.monotonic() - started:6.0f} s  {line}[/dim]")

    built = build_zoo(root, force=force, large=large, progress=say)
    for path in built:
        console.print(f"[green]ready[/green] {path}")


@app.command()
def schema(
    write: Annotated[bool, typer.Option(help="write schemas/json/*.schema.json, schemas/asyncapi.json and the "
                                              "README's outputs section instead of printing the schemas")] = False,
) -> None:
    """JSON Schemas of every wire message (job, result, commands, status events) and the manifest."""
    from control.contracts import json_schemas, write_contracts

    if not write:
        print(json.dumps(json_schemas(), indent=2))
        return
    for path in write_contracts():
        console.print(f"wrote {path}")


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
