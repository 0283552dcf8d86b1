"""`make demo`: two workers, real photos through a detection, a face and (with the large zoo) a
human-parsing model side by side, held-out shapes scored by the detection evaluator, throughput."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from control.annotate import draw_result, side_by_side
from control.client import DEFAULT_AMQP_URL, Client
from control.processes import WorkerProcess
from control.render import print_result
from control.zoo import build_zoo
from schemas.jobs import JobResult
from schemas.manifest import ExpectedObject
from worker.outputs import score_results
from worker.runtime.evaluation import Score

NAMESPACE = "hotswap-demo"
OUT = Path("out") / "demo"
THROUGHPUT_JOBS = 400
DETECTOR = "shapes"
#: Shown beside the detector on the photos, where the zoo has them (`parsing`: `hotswap zoo build --large`).
OTHER_MODELS = ("faces-mtcnn", "parsing")
#: Shown instead of a missing model: ULFD's seeded random weights where MTCNN's real ones are not built.
FALLBACKS = {"faces-mtcnn": "faces"}
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
    shown = (m if (root / m).is_dir() else FALLBACKS.get(m, m) for m in OTHER_MODELS)
    models = [DETECTOR, *(m for m in shown if (root / m).is_dir())]
    for model in models:
        versions = sorted(p.name for p in (root / model).iterdir() if not p.name.startswith("."))
        console.print(f"zoo ready in {root}/{model}: {', '.join(versions)}")
    if "parsing" not in models:
        console.print("[dim]no human-parsing model: `hotswap zoo build --large` builds M2FP (random weights)[/dim]")
    console.rule("starting two workers")
    workers = [
        WorkerProcess(
            models=models,
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
        asyncio.run(_submit_everything(url, root, models))
    finally:
        console.rule("stopping workers (SIGTERM)")
        for worker in workers:
            code = worker.stop()
            console.print(f"{worker.env['HOTSWAP_WORKER_ID']} exited with {code}; log in {worker.log_path}")
    return 0


async def _submit_everything(url: str, root: Path, models: list[str]) -> None:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    heldout_dir = root / "_data" / "shapes-heldout"
    labels = json.loads((heldout_dir / "labels.json").read_text())
    async with Client(url, namespace=NAMESPACE) as client:
        console.rule(f"ultralytics' bundled photos through {', '.join(models)} "
                     f"({DETECTOR} knows only circles, squares, triangles)")
        for photo in sorted(assets.glob("*.jpg")):
            results = await asyncio.gather(*(client.submit(photo, model=m) for m in models))
            for result in results:
                print_result(photo.name, result, console)
            if all(r.status == "ok" for r in results):
                console.print(f"  side by side: {side_by_side(photo, results, OUT)}")
        console.rule(f"{len(labels)} held-out shapes images")
        paths = [heldout_dir / item["file"] for item in labels]
        results = await asyncio.gather(*(client.submit(p, model=DETECTOR) for p in paths))
        _print_accuracy(labels, results)
        for path, result in list(zip(paths, results, strict=True))[:2]:
            print_result(path.name, result, console)
            console.print(f"  annotated: {draw_result(path, result, OUT)}")
        console.rule(f"throughput: {THROUGHPUT_JOBS} jobs, two workers")
        await _throughput(client, paths)


def heldout_score(labels: list[dict[str, Any]], results: list[JobResult]) -> Score:
    """Recall of the held-out shapes, by the detection evaluator validation uses."""
    expected = [[ExpectedObject(class_name=box["class_name"], box=box["box"]) for box in item["boxes"]]
                for item in labels]
    return score_results("detect", zip(expected, results, strict=True))


def _print_accuracy(labels: list[dict[str, Any]], results: list[JobResult]) -> None:
    score = heldout_score(labels, results)
    detected = sum(len(r.detections) for r in results)
    versions = Counter(f"{r.model}/{r.version}" for r in results)
    table = Table(title="held-out accuracy (IoU ≥ 0.5, class must match)", title_justify="left")
    for column in ("served by", "shapes", "found", "recall", "detections", "precision"):
        table.add_column(column, justify="right")
    table.add_row(", ".join(versions), str(score.expected), str(score.found), f"{score.recall:.2f}",
                  str(detected), f"{score.found / max(detected, 1):.2f}")
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
