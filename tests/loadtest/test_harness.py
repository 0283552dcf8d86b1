"""The load-test harness: exact accounting, the report files, the CLI, short real runs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import pytest
from typer.testing import CliRunner

from control.cli import app
from control.client import Client
from loadtest.harness import HarnessConfig, run_harness
from loadtest.records import Accountant, Check, ControlEvent
from loadtest.report import build_report, percentile, write_files
from loadtest.runner import LoadShape, Runner
from schemas.errors import ErrorCode
from schemas.jobs import InlineImage, Job, JobError, JobResult
from schemas.signing import KeyFiles
from schemas.topology import Topology
from worker.declarer import Declarer

if TYPE_CHECKING:
    from conftest import HeldOut, StartWorker


def result_body(job_id: str, *, code: str | None = None, attempt: int = 1, worker: str = "w1",
                version: str = "1.0.0") -> bytes:
    error = JobError(code=ErrorCode(code), message=code) if code else None
    return JobResult(job_id=job_id, status="error" if code else "ok", model="shapes", version=version,
                     worker_id=worker, attempt=attempt, error=error).model_dump_json().encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_accountant_counts_every_outcome_exactly() -> None:
    clock = FakeClock()
    accountant = Accountant(clock=clock)
    for job_id in ("ok", "expired", "broken", "twice", "copied", "dropped", "unrouted"):
        accountant.submitted(job_id, f"{job_id}.png", "shapes")
    with pytest.raises(ValueError, match="already submitted"):
        accountant.submitted("ok", "again.png", "shapes")

    clock.now += 0.25
    accountant.received("ok", result_body("ok"))
    accountant.received("expired", result_body("expired", code="expired"))
    accountant.received("broken", result_body("broken", code="not_an_image"))
    accountant.received("twice", result_body("twice", worker="w1"))
    accountant.received("twice", result_body("twice", worker="w2", attempt=2))  # the job ran twice
    accountant.received("copied", result_body("copied"))
    accountant.received("copied", result_body("copied"), True)  # the broker re-sent our unacked copy
    accountant.received("someone-else", result_body("someone-else"))
    accountant.received("ok", b"not a result")
    accountant.publish_failed("unrouted")
    assert accountant.pending == 1

    counts = accountant.finish()
    accountant.received("dropped", result_body("dropped"))  # after the end: too late to count

    assert (counts.submitted, counts.answered, counts.ok, counts.failed, counts.expired, counts.lost) == (
        7, 5, 3, 3, 1, 1)
    assert (counts.duplicated, counts.duplicate_results, counts.redeliveries) == (1, 1, 1)
    assert (counts.unexpected, counts.invalid, counts.pending, counts.retried) == (1, 1, 0, 0)
    assert not counts.clean
    records = accountant.records
    assert records["dropped"].status == "lost" and records["dropped"].results == 0
    assert records["unrouted"].error_code == "no_route"
    assert records["twice"].worker_id == "w1" and records["twice"].results == 2  # the first result counts
    assert records["ok"].latency_ms == pytest.approx(250.0)
    assert records["expired"].error_code == "expired" and records["expired"].version == "1.0.0"


def test_report_summarises_and_writes_json_jobs_and_png(tmp_path: Path) -> None:
    clock = FakeClock()
    accountant = Accountant(clock=clock)
    t0 = clock.now
    for i in range(30):
        clock.now = t0 + i * 0.1
        accountant.submitted(f"j{i}", "a.png", "shapes")
    for i in range(29):
        clock.now = t0 + i * 0.1 + 0.05 + 0.001 * i
        accountant.received(f"j{i}", result_body(f"j{i}", worker=f"w{i % 2}", version="2.0.0" if i > 20 else "1.0.0"))
    accountant.finish()
    events = [ControlEvent(t0 + 1.5, "update → 2.0.0 published"), ControlEvent(t0 + 2.0, "done", ok=True)]
    report = build_report(accountant, started_at=t0, stopped_at=t0 + 3.0, events=events,
                          checks=[Check("update → 2.0.0", True, "done")],
                          run={"scenario": "update", "model": "shapes", "loop": "closed loop at concurrency 1"})
    files = write_files(report, accountant, t0, tmp_path)

    written = json.loads(files["report"].read_text())
    assert written["passed"] is False and written["problems"] == ["1 lost"]
    summary = written["summary"]
    assert (summary["submitted"], summary["answered"], summary["ok"], summary["lost"]) == (30, 29, 29, 1)
    assert written["versions"] == {"1.0.0": 21, "2.0.0": 8}
    assert written["workers"] == {"w0": 15, "w1": 14}
    assert [e["t_s"] for e in written["events"]] == [1.5, 2.0]
    assert sum(b["submitted"] for b in written["timeline"]) == 30
    assert sum(b["answered"] for b in written["timeline"]) == 29
    assert sum(b["lost"] for b in written["timeline"]) == 1
    jobs = [json.loads(line) for line in files["jobs"].read_text().splitlines()]
    assert len(jobs) == 30 and jobs[-1]["status"] == "lost" and jobs[0]["submitted_s"] == 0.0
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 99) is None


def test_cli_is_registered_and_refuses_impossible_runs() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["loadtest", "run", "--help"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0
    for option in ("--scenario", "--rate", "--concurrency", "--duration", "--jobs", "--workers", "--out"):
        assert option in shown.output
    both = runner.invoke(app, ["loadtest", "run", "--rate", "5", "--concurrency", "2"])
    assert both.exit_code == 2 and "not both" in both.output
    # Killing a worker needs workers the harness started itself: refused before touching the broker.
    kill = runner.invoke(app, ["loadtest", "run", "--scenario", "kill-worker", "--jobs", "3"])
    assert kill.exit_code == 2 and "--workers 2" in kill.output


@pytest.mark.slow
def test_steady_run_reports_nothing_lost_and_writes_json_and_png(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut], tmp_path: Path
) -> None:
    start_worker("shapes@1.0.0")
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "control", "loadtest", "run", "--scenario", "steady", "--model", "shapes",
         "--concurrency", "2", "--jobs", "60", "--images", str(heldout[0].path.parent), "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "COLUMNS": "160", "HOTSWAP_AMQP_URL": amqp_url, "HOTSWAP_NAMESPACE": namespace},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS" in run.stdout
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert (summary["submitted"], summary["answered"], summary["ok"]) == (60, 60, 60)
    assert (summary["lost"], summary["failed"], summary["duplicated"], summary["expired"]) == (0, 0, 0, 0)
    assert report["passed"] is True and report["workers"] == {"w1": 60} and report["versions"] == {"1.0.0": 60}
    assert summary["latency_ms"]["p50"] is not None and summary["throughput_jobs_per_s"] > 0
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "jobs.jsonl").read_text().splitlines()) == 60


@pytest.mark.slow
async def test_a_dropped_job_is_lost_and_a_job_run_twice_is_duplicated(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut]
) -> None:
    start_worker("shapes@1.0.0")
    accountant = Accountant()
    image = heldout[0].path.read_bytes()

    def body(job_id: str, model: str) -> bytes:
        job = Job(job_id=job_id, model=model, image=InlineImage(data=image), submitted_at=datetime.now(UTC))
        return job.model_dump_json(exclude_none=True).encode()

    async with Client(amqp_url, namespace=namespace, observer=accountant.received) as client:
        # `other`'s job queue, as a worker would declare it, that no worker consumes: accepted, never answered.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await Declarer(await connection.channel(), Topology(namespace)).job_queue("other", delivery_limit=3)
        accountant.submitted("dropped", "dropped.png", "other")
        await client.publish_raw(body("dropped", "other"), model="other", job_id="dropped")
        # The same job published twice (same correlation id and reply queue): it runs twice.
        accountant.submitted("twice", "twice.png", "shapes")
        await client.publish_raw(body("twice", "shapes"), model="shapes", job_id="twice")
        await client.publish_raw(body("twice", "shapes"), model="shapes", job_id="twice")

        shape = LoadShape(model="shapes", images=[h.path for h in heldout[:5]], concurrency=2, jobs=20, grace_s=3)
        runner = Runner(client, accountant, shape, show_progress=False)
        await runner.run()
        for _ in range(600):  # both results of `twice` are in (no timing assumed: wait for them)
            if accountant.records["twice"].results == 2:
                break
            await asyncio.sleep(0.1)
        await runner.drain()

    counts = accountant.counts()
    assert (counts.submitted, counts.answered, counts.ok, counts.failed) == (22, 21, 21, 0)
    assert counts.lost == 1 and accountant.records["dropped"].status == "lost"
    assert (counts.duplicated, counts.duplicate_results) == (1, 1)
    assert accountant.records["twice"].status == "ok" and accountant.records["twice"].results == 2
    assert counts.unexpected == 0 and counts.invalid == 0
    assert runner.started_at is not None and runner.stopped_at is not None
    report = build_report(accountant, started_at=runner.started_at, stopped_at=runner.stopped_at, events=[],
                          checks=[], run={"scenario": "steady", "model": "shapes", "loop": shape.loop})
    assert report["passed"] is False and report["problems"] == ["1 lost"]
    assert report["summary"]["duplicated"] == 1


@pytest.mark.slow
async def test_hot_updates_under_load_lose_nothing(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut], control_keys: KeyFiles,
    model_root: Path, tmp_path: Path
) -> None:
    from rich.console import Console

    start_worker("shapes@1.0.0")
    config = HarnessConfig(
        scenario="update", url=amqp_url, namespace=namespace, out=tmp_path / "update", model_root=model_root,
        key=control_keys[0], versions=("1.0.0", "2.0.0"), updates=1, show_progress=False,
        shape=LoadShape(model="shapes", images=[h.path for h in heldout], rate=15, duration_s=10, grace_s=20),
    )
    printed = io.StringIO()
    outcome = await run_harness(config, Console(file=printed, width=160))

    report = outcome.report
    assert outcome.exit_code == 0, printed.getvalue()
    assert report["summary"]["lost"] == 0 and report["summary"]["failed"] == 0
    assert [c["name"] for c in report["checks"]] == ["update → 2.0.0", "jobs after the last command served by 2.0.0"]
    assert any(e["label"].startswith("update → 2.0.0 done") for e in report["events"])
    assert "2.0.0" in report["versions"]
    assert outcome.files["plot"].exists() and outcome.files["report"].exists()


@pytest.mark.slow
async def test_a_broker_restart_under_load_loses_nothing(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut], tmp_path: Path
) -> None:
    """The real thing: RabbitMQ's application stops and starts (queues recover, transient state is
    gone) while jobs flow. Results of persistent jobs sit in durable reply queues, and a result whose
    reply queue is not back yet waits for it: nothing may be lost."""
    from rich.console import Console

    start_worker("shapes@1.0.0", name="r1")
    start_worker("shapes@1.0.0", name="r2")
    config = HarnessConfig(
        scenario="broker-restart", broker_scope="restart", url=amqp_url, namespace=namespace,
        out=tmp_path / "restart", show_progress=False,
        shape=LoadShape(model="shapes", images=[h.path for h in heldout], concurrency=32, duration_s=12, grace_s=60),
    )
    printed = io.StringIO()
    outcome = await run_harness(config, Console(file=printed, width=160))
    report = outcome.report
    assert report["checks"][0]["name"] == "broker-restart (restart)" and report["checks"][0]["passed"], report["checks"]
    assert report["summary"]["lost"] == 0 and report["summary"]["failed"] == 0, printed.getvalue()
    assert outcome.exit_code == 0, printed.getvalue()
    # Jobs the workers held when the broker went down came back and ran again.
    assert report["summary"]["answered"] > 100
