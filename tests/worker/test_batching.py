from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.batching import MicroBatcher
from worker.metrics import WorkerMetrics
from worker.runtime.backend import Image, ModelBackend, create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.lifecycle import ModelVersion
from worker.runtime.predictions import Prediction
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


class GatedBackend:
    """The real backend, each predict held until the test lets one through: batches end when the
    test says, so what is queued while one runs is the test's to arrange. Records each batch."""

    def __init__(self, backend: ModelBackend) -> None:
        self.backend = backend
        self.gate = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.batches: list[tuple[tuple[int, ...], int]] = []  # (image shape, size) in the order run

    def load(self, artifact: Path, manifest: Manifest) -> None:
        self.backend.load(artifact, manifest)

    def warm_up(self) -> None:
        self.backend.warm_up()

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        self.batches.append((images[0].shape, len(images)))
        self.started.release()
        self.gate.acquire()
        return self.backend.predict(images, params)

    def release(self) -> None:
        self.backend.release()

    async def next_batch_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, 10)


def _gated(version: ModelVersion) -> tuple[ModelVersion, GatedBackend]:
    assert version.backend is not None
    gated = GatedBackend(version.backend)
    return ModelVersion(version.model, version.version, backend=gated, manifest=version.manifest), gated


async def test_a_batch_that_waited_keeps_filling_while_a_full_one_queued_before_it_runs(
    version: ModelVersion, heldout: list[HeldOut]
) -> None:
    gated_version, gated = _gated(version)
    image = decode_image(heldout[0].path.read_bytes(), LIMITS)
    params = InferenceParams()
    with LoopThreads(1, "inference") as threads:
        batcher = MicroBatcher(threads, max_batch=4, max_wait_ms=1, metrics=WorkerMetrics())

        def submit(count: int) -> list[asyncio.Task[Prediction]]:
            return [asyncio.create_task(batcher.predict(gated_version, image, params)) for _ in range(count)]

        jobs = submit(4)  # full: runs at once
        await asyncio.sleep(0)
        await gated.next_batch_started()
        jobs += submit(4)  # full: queued behind it
        jobs += submit(1)  # waits its millisecond, then is due while the thread is busy
        await asyncio.sleep(0.02)
        gated.gate.release()  # the first batch ends; the full one queued behind it starts
        await gated.next_batch_started()
        jobs += submit(3)  # joins the batch that waited: now full
        await asyncio.sleep(0.02)
        for _ in range(4):
            gated.gate.release()
        await asyncio.gather(*jobs)
    # Flushed at the first batch's end, the one that waited would have run alone, then the 3 after it.
    assert [size for _, size in gated.batches] == [4, 4, 4]


async def test_a_waiting_batch_of_another_kind_is_not_held_back_by_a_stream_of_full_ones(
    version: ModelVersion, heldout: list[HeldOut], bus_jpg: Path
) -> None:
    gated_version, gated = _gated(version)
    image = decode_image(heldout[0].path.read_bytes(), LIMITS)
    photo = decode_image(bus_jpg.read_bytes(), LIMITS)  # another size: a batch of its own
    params = InferenceParams()
    with LoopThreads(1, "inference") as threads:
        batcher = MicroBatcher(threads, max_batch=4, max_wait_ms=1, metrics=WorkerMetrics())

        def submit(picture: Image, count: int) -> list[asyncio.Task[Prediction]]:
            return [asyncio.create_task(batcher.predict(gated_version, picture, params)) for _ in range(count)]

        jobs = submit(image, 4)
        await asyncio.sleep(0)
        await gated.next_batch_started()
        jobs += submit(image, 4)  # queued
        jobs += submit(photo, 1)  # due while the thread is busy
        await asyncio.sleep(0.02)
        for _ in range(4):  # a steady stream: each time a batch ends, another full one is queued
            jobs += submit(image, 4)
            await asyncio.sleep(0)
            gated.gate.release()
            await gated.next_batch_started()
        for _ in range(8):
            gated.gate.release()
        await asyncio.gather(*jobs)
    order = [shape for shape, _ in gated.batches]
    # Flushed at the second batch end after it was due, behind the two full batches queued by then;
    # not held back behind the whole stream (index 6), nor run part-full at the first end (index 3).
    assert order.index(photo.shape) == 4, order
    assert [size for shape, size in gated.batches if shape == photo.shape] == [1]
