from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from schemas.jobs import InferenceParams
from worker.batching import MicroBatcher
from worker.metrics import WorkerMetrics
from worker.runtime.backend import create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.lifecycle import ModelVersion
from worker.runtime.repository import ModelRepository
from worker.threads import LoopThreads

if TYPE_CHECKING:
    from conftest import HeldOut

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)


@pytest.fixture(scope="module")
def version(zoo: Path) -> ModelVersion:
    repository = ModelRepository(zoo)
    entry = repository.get("shapes", "2.0.0")
    backend = create_backend("ultralytics", "cpu")
    backend.load(repository.verified_artifact(entry), entry.manifest)
    return ModelVersion("shapes", "2.0.0", backend=backend, manifest=entry.manifest)


def batch_sizes(metrics: WorkerMetrics) -> tuple[float, float]:
    """(batches, images) observed so far."""
    samples = {s.name: s.value for m in metrics.registry.collect() for s in m.samples if "batch_size" in s.name}
    return samples["hotswap_batch_size_count"], samples["hotswap_batch_size_sum"]


async def test_concurrent_jobs_share_batches_and_get_single_image_answers(
    version: ModelVersion, heldout: list[HeldOut], bus_jpg: Path
) -> None:
    metrics = WorkerMetrics()
    with LoopThreads(1, "inference") as threads:
        batcher = MicroBatcher(threads, max_batch=8, max_wait_ms=20, metrics=metrics)
        images = [decode_image(h.path.read_bytes(), LIMITS) for h in heldout[:16]]
        photo = decode_image(bus_jpg.read_bytes(), LIMITS)
        params = InferenceParams(conf=0.1)
        batched = await asyncio.gather(*(batcher.predict(version, image, params) for image in [*images, photo]))
        assert version.backend is not None
        single = [version.backend.predict([image], params)[0] for image in [*images, photo]]
    batches, total = batch_sizes(metrics)
    assert total == 17 and batches <= 4, "16 same-sized images in batches of ≤ 8, the photo alone"
    for ours, theirs in zip(batched, single, strict=True):
        assert np.array_equal(ours.class_ids, theirs.class_ids)
        assert np.allclose(ours.boxes, theirs.boxes, atol=1e-3)


async def test_batch_of_one_when_batching_is_off(version: ModelVersion, heldout: list[HeldOut]) -> None:
    metrics = WorkerMetrics()
    with LoopThreads(1, "inference") as threads:
        batcher = MicroBatcher(threads, max_batch=1, max_wait_ms=0, metrics=metrics)
        image = decode_image(heldout[0].path.read_bytes(), LIMITS)
        await asyncio.gather(*(batcher.predict(version, image, InferenceParams()) for _ in range(5)))
    assert batch_sizes(metrics) == (5, 5)


async def test_a_failing_batch_fails_each_of_its_jobs(heldout: list[HeldOut]) -> None:
    broken = ModelVersion("shapes", "x")  # no backend: predicting must fail, not hang
    with LoopThreads(1, "inference") as threads:
        batcher = MicroBatcher(threads, max_batch=4, max_wait_ms=5, metrics=WorkerMetrics())
        image = decode_image(heldout[0].path.read_bytes(), LIMITS)
        results = await asyncio.gather(
            *(batcher.predict(broken, image, InferenceParams()) for _ in range(3)), return_exceptions=True
        )
    assert all(isinstance(r, RuntimeError) for r in results)
