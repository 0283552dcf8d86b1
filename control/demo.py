"""`make demo`: two workers, real photos and held-out shapes, results and throughput."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from control.annotate import draw_detections
from control.cli import print_result
from control.client import DEFAULT_AMQP_URL, Client
from control.processes import WorkerProcess
from control.zoo import build_zoo
from schemas.jobs import Box, JobResult

NAMESPACE = "hotswap-demo"
OUT = Path("out") / "demo"
THROUGHPUT_JOBS = 400
console = Console()


def run_demo(root: Path, amqp_url: str | None) -> int:
    url = amqp_url or DEFAULT_AMQP_URL
    if not _reachable(url):
        console.print(
            f"[red]No RabbitMQ broker at {urlparse(url).hostname}:{urlparse(url).port or 5672}.[/red]\n"
            "Start one with  [bold]rabbitmq-server -detached[/bold]  (local install) or  "
            "[bold]docker compose up -d rabbitmq[/bold], or point HOTSWAP_AMQP_URL at yours."
        )
        return 1
    console.rule("model zoo")
    build_zoo(root, progress=lambda line: console.print(f"[dim]{line}[/dim]"))
    versions = sorted(p.name for p in (root / "shapes").iterdir() if not p.name.startswith("."))
    console.print(f"zoo ready in {root}/shapes: {', '.join(versions)}")
    console.rule("starting two workers")
    workers = [
        WorkerProcess(
            models=["shapes"],
            log_path=OUT / f"worker-{i}.log",
            env={"HOTSWAP_MODEL_ROOT": str(root.resolve()), "HOTSWAP_AMQP_URL": url,
                 "HOTSWAP_NAMESPACE": NAMESPACE, "HOTSWAP_WORKER_ID": f"demo-{i}"},
        )
        for i in (1, 2)
    ]
    try:
        for worker in workers:
            worker.start()
            console.print(f"worker {worker.env['HOTSWAP_WORKER_ID']} ready, status at {worker.url}/status")
        asyncio.run(_submit_everything(url, root))
    finally:
        console.rule("stopping workers (SIGTERM)")
        for worker in workers:
            code = worker.stop()
            console.print(f"{worker.env['HOTSWAP_WORKER_ID']} exited with {code}; log in {worker.log_path}")
    return 0


async def _submit_everything(url: str, root: Path) -> None:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    heldout_dir = root / "_data" / "shapes-heldout"
    labels = json.loads((heldout_dir / "labels.json").read_text())
    async with Client(url, namespace=NAMESPACE) as client:
        console.rule("ultralytics' bundled photos (the model knows only circles, squares, triangles)")
        for photo in sorted(assets.glob("*.jpg")):
            result = await client.submit(photo, model="shapes")
            print_result(photo.name, result)
        console.rule(f"{len(labels)} held-out shapes images")
        paths = [heldout_dir / item["file"] for item in labels]
        results = await asyncio.gather(*(client.submit(p, model="shapes") for p in paths))
        _print_accuracy(labels, results)
        for path, result in list(zip(paths, results, strict=True))[:2]:
            print_result(path.name, result)
            console.print(f"  annotated: {draw_detections(path, result, OUT)}")
        console.rule(f"throughput: {THROUGHPUT_JOBS} jobs, two workers")
        await _throughput(client, paths)


def _print_accuracy(labels: list[dict[str, object]], results: list[JobResult]) -> None:
    expected = found = detected = 0
    for item, result in zip(labels, results, strict=True):
        boxes = item["boxes"]
        assert isinstance(boxes, list)
        expected += len(boxes)
        detected += len(result.detections)
        for truth in boxes:
            box = Box.of(truth["box"])
            found += any(d.class_name == truth["class_name"] and d.box.iou(box) >= 0.5 for d in result.detections)
    versions = Counter(f"{r.model}/{r.version}" for r in results)
    table = Table(title="held-out accuracy (IoU ≥ 0.5, class must match)", title_justify="left")
    for column in ("served by", "shapes", "found", "recall", "detections", "precision"):
        table.add_column(column, justify="right")
    table.add_row(", ".join(versions), str(expected), str(found), f"{found / max(expected, 1):.2f}",
                  str(detected), f"{found / max(detected, 1):.2f}")
    console.print(table)


async def _throughput(client: Client, paths: list[Path]) -> None:
    images = [p.read_bytes() for p in paths]
    columns = (TextColumn("jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.perf_counter()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("jobs", total=THROUGHPUT_JOBS)

        async def one(i: int) -> JobResult:
            result = await client.submit(images[i % len(images)], model="shapes")
            progress.advance(task)
            return result

        results = await asyncio.gather(*(one(i) for i in range(THROUGHPUT_JOBS)))
    elapsed = time.perf_counter() - started
    latencies = sorted(
        (r.timings.queue_wait_ms or 0) + r.timings.total_ms for r in results
    )
    table = Table(
        title="throughput (all jobs submitted at once: latency includes the wait in the queue)", title_justify="left"
    )
    for column in ("jobs", "ok", "seconds", "jobs/s", "p50 ms", "p95 ms", "per worker"):
        table.add_column(column, justify="right")
    per_worker = ", ".join(f"{w}: {n}" for w, n in sorted(Counter(r.worker_id for r in results).items()))
    table.add_row(
        str(len(results)), str(sum(r.status == "ok" for r in results)), f"{elapsed:.2f}",
        f"{len(results) / elapsed:.1f}", f"{statistics.median(latencies):.1f}",
        f"{latencies[int(0.95 * (len(latencies) - 1))]:.1f}", per_worker,
    )
    console.print(table)
    console.print(f"duplicates dropped by the client: {client.duplicates}")


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=3).close()
        return True
    except OSError:
        return False
