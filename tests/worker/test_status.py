"""/healthz, /readyz, /status and /metrics over HTTP, with values that move as jobs run."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aio_pika.abc import AbstractQueue

from control.client import Client
from schemas.errors import ErrorCode
from worker.declarer import Declarer
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, Metric, ServeInProcess, StartWorker


async def test_status_endpoints_move_with_jobs(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    worker = await serve_in_process("shapes@1.0.0", name="observed")
    assert await worker.get("/healthz") == {"status": "ok"}
    assert await worker.get("/readyz") == {"ready": True}
    before = await worker.get("/status")
    assert before["worker_id"] == "observed" and before["pid"] == os.getpid()
    assert before["models"]["shapes"]["active"] == "1.0.0"
    assert before["models"]["shapes"]["versions"]["1.0.0"]["state"] == "active"
    assert (before["jobs_done"], before["jobs_failed"], before["last_error"]) == (0, 0, None)
    metrics_before = await worker.text("/metrics")
    assert metric(metrics_before, "hotswap_broker_connected") == 1
    assert metric(metrics_before, "hotswap_model_version_info", model="shapes", version="1.0.0",
                  state="active", backend="ultralytics") == 1

    await asyncio.gather(*(client.submit(h.path, model="shapes") for h in heldout[:10]))
    failed = await client.submit(b"not an image", model="shapes")
    assert failed.error is not None and failed.error.code is ErrorCode.NOT_AN_IMAGE

    # A job leaves the in-flight count once its ack is sent, just after its result: a moment
    # after the client has the last result. Then nothing may be left in flight.
    async with asyncio.timeout(5):
        while (after := await worker.get("/status"))["in_flight"]:
            await asyncio.sleep(0.02)
    assert (after["jobs_done"], after["jobs_failed"]) == (10, 1)
    assert after["last_error"]["code"] == "not_an_image"
    assert after["uptime_s"] > before["uptime_s"]
    metrics = await worker.text("/metrics")
    ok = {"model": "shapes", "version": "1.0.0", "status": "ok", "code": ""}
    assert metric(metrics, "hotswap_jobs_total", **ok) == 10
    assert metric(metrics, "hotswap_jobs_total", model="shapes", status="error", code="not_an_image") == 1
    assert metric(metrics, "hotswap_job_phase_seconds_count", model="shapes", phase="queue_wait") == 11
    for phase in ("decode", "inference"):
        assert metric(metrics, "hotswap_job_phase_seconds_count", model="shapes", phase=phase) == 10
    assert metric(metrics, "hotswap_job_phase_seconds_count", model="shapes", phase="total") == 11
    assert metric(metrics, "hotswap_job_phase_seconds_sum", model="shapes", phase="inference") > 0
    assert metric(metrics, "hotswap_jobs_in_flight", model="shapes") == 0
    assert "# TYPE hotswap_job_phase_seconds histogram" in metrics


@pytest.mark.slow  # a signal: a process of its own
async def test_readyz_says_why_not_while_stopping(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut]
) -> None:
    worker = start_worker("shapes@1.0.0", args=["--grace-period", "5"])
    jobs = [asyncio.create_task(client.submit(heldout[i % 40].path, model="shapes")) for i in range(100)]
    await asyncio.sleep(0.3)
    worker.signal(__import__("signal").SIGTERM)
    reasons: list[str] = []
    for _ in range(50):
        answer = worker.get("/readyz", ok_only=False)
        if answer.get("reasons"):
            reasons = answer["reasons"]
            break
        await asyncio.sleep(0.02)
    assert "shutting down" in reasons
    start_worker("shapes@1.0.0")
    assert all(r.status == "ok" for r in await asyncio.gather(*jobs))


async def test_profile_counts_each_step_of_every_job_in_its_thread(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut]
) -> None:
    from worker.runtime.profiling import STEPS

    try:
        worker = await serve_in_process("shapes@1.0.0", name="profiled", profile=True)
        before = await worker.get("/profile")
        assert before["enabled"] is True
        await asyncio.gather(*(client.submit(h.path, model="shapes") for h in heldout[:6]))
        async with asyncio.timeout(5):
            while (await worker.get("/status"))["in_flight"]:
                await asyncio.sleep(0.02)
        after = await worker.get("/profile")
    finally:
        STEPS.enabled = False  # process-wide: the other tests' workers do not profile

    def count(key: str) -> int:
        return int(after["steps"].get(key, {"count": 0})["count"] - before["steps"].get(key, {"count": 0})["count"])

    # Once per job on the loop, once in the decode threads; the batcher's two stretches per job
    # (joining a batch, and the batch's answers); the backend's steps once per batch.
    for step in ("parse", "route", "header", "result", "encode", "serialize", "ack"):
        assert count(f"loop/{step}") == 6, (step, after["steps"])
    assert count("decode/decode") == 6
    assert count("loop/bookkeeping") == 6 * 3  # in flight up, the answer counted, in flight down
    batches = count("inference/forward")
    assert 1 <= batches <= 6 and count("inference/letterbox") == count("inference/nms") == batches
    assert count("loop/batch") == 6 + batches
    assert after["threads"]["loop"] > before["threads"]["loop"]
    assert after["threads"]["inference"] > 0


async def test_ready_only_once_every_models_queue_is_consumed(
    serve_in_process: ServeInProcess, client: Client, model_root: Path, bus_jpg: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queues are declared and bound one model after another (about 0.5 s apiece on a busy broker):
    a worker ready after its first would send producers of the others NoRoute."""
    write_trivial_model(model_root, "1.0.0", whole_image=True, name="other")
    declare = Declarer.job_queue

    async def slowly_for_other(self: Declarer, model: str, delivery_limit: int) -> AbstractQueue:
        if model == "other":
            await asyncio.sleep(1.0)
        return await declare(self, model, delivery_limit)

    monkeypatch.setattr(Declarer, "job_queue", slowly_for_other)
    await serve_in_process("trivial@1.0.0", "other@1.0.0")  # returns once /readyz would say ready
    results = await asyncio.gather(*(client.submit(bus_jpg, model=m) for m in ("trivial", "other")))
    assert [(r.status, r.model) for r in results] == [("ok", "trivial"), ("ok", "other")]
