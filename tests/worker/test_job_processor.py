"""The job processor's own rules, on a whole worker in the test's event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from control.client import Client
from schemas.control import Shadow
from worker.app import Worker
from worker.runtime.desired import DesiredState
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, ServeInProcess

pytestmark = pytest.mark.slow


def dropped(worker: Worker, reason: str) -> float:
    return sum(sample.value for family in worker.metrics.registry.collect() for sample in family.samples
               if sample.name == "hotswap_shadow_dropped_total" and sample.labels["reason"] == reason)


async def test_shadow_work_is_bounded_and_dropped_before_it_delays_primary_jobs(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], tmp_path: Path
) -> None:
    root = tmp_path / "shadowed"
    write_trivial_model(root, "1.0.0", whole_image=True)
    write_trivial_model(root, "2.0.0-slow", whole_image=True, delay_ms=40)
    worker = await serve_in_process(model_root=root, max_shadow_in_flight=2, max_batch=1,
                                    max_pixels_in_flight=3 * 128 * 128)
    await worker.models.reconcile(DesiredState("trivial", active="1.0.0",
                                               shadow=Shadow(version="2.0.0-slow", percent=100)))
    processor = worker.processor
    assert processor is not None
    most_shadows = most_pixels = 0

    async def watch() -> None:
        nonlocal most_shadows, most_pixels
        while True:
            most_shadows = max(most_shadows, processor.shadows_in_flight)
            most_pixels = max(most_pixels, processor.pixels.held)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(client.submit(heldout[i % 8].path, model="trivial") for i in range(60)))
    watcher.cancel()
    assert all((r.status, r.version) == ("ok", "1.0.0") for r in results)
    assert 1 <= most_shadows <= 2, most_shadows
    assert most_pixels <= 3 * 128 * 128, "shadows took pixels beyond the budget"
    assert dropped(worker, "limit") + dropped(worker, "backlog") + dropped(worker, "pixels") > 0
    async with asyncio.timeout(5):
        while processor.shadows_in_flight:
            await asyncio.sleep(0.01)
    assert processor.pixels.held == 0
