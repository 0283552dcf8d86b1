"""Micro-batching: jobs for the same model version run as one batch.

A job joins the open batch of its version, parameters and image size (only then does a batch
give each image exactly what a single predict would: ultralytics letterboxes mixed sizes
differently). A batch runs when it holds `max_batch` jobs, or when its first job has waited
`max_wait_ms` and the inference thread is idle; while that thread is busy, waiting batches keep
filling, and the oldest runs as soon as it is free: when nothing else is queued for it, or at
the latest at the second batch end after it became due, behind what is queued by then (so a
steady stream of full batches of one kind holds another kind's back by a batch or two, not for
good).

Not flushing a waiting batch behind a full one that is already queued is what keeps batches
full under load: bench 1 (`--quick`, alternated, four runs each) ran batches of 15.3 to 15.8 of
16 with it against 10.6 to 14.9 without, and the model costs about a fifth more per image at
batch 11 than at 16 (`loadtest.bench_inprocess`: 2.39 to 2.47 against 1.96 to 2.06 ms).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from schemas.jobs import InferenceParams
from worker.metrics import WorkerMetrics
from worker.runtime.backend import Image, ModelBackend
from worker.runtime.lifecycle import ModelVersion
from worker.runtime.predictions import Prediction
from worker.runtime.profiling import STEPS
from worker.threads import LoopThreads

BatchKey = tuple[int, InferenceParams, tuple[int, ...]]


@dataclass
class _Batch:
    version: ModelVersion
    params: InferenceParams
    images: list[Image] = field(default_factory=list)
    futures: list[asyncio.Future[Prediction]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


#: Batches of each size a version runs before their times count as its speed: its warm-up.
WARM_UP_BATCHES = 2


#: Told of each batch that ran: its version, its size and the milliseconds it took in the inference
#: thread, once the version is warm for that size (the evidence rollouts judge latency by).
BatchObserver = Callable[[ModelVersion, int, float], None]


class MicroBatcher:
    def __init__(self, threads: LoopThreads, max_batch: int, max_wait_ms: float, metrics: WorkerMetrics,
                 on_batch: BatchObserver | None = None) -> None:
        self.threads = threads
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.metrics = metrics
        self._open: dict[BatchKey, _Batch] = {}
        #: Waited long enough; run when the thread is free. The value: a batch end has passed it
        #: over once already (a full batch was queued); at the next it runs anyway.
        self._due: dict[BatchKey, bool] = {}
        self._busy = 0  # batches handed to the inference thread and not finished
        self._running: set[asyncio.Task[None]] = set()
        self._started: dict[int, float] = {}  # inference thread → when its current predict began

    @property
    def backlogged(self) -> bool:
        """Batches are waiting for the inference thread (work that can wait should not add to it)."""
        return bool(self._due) or self._busy > 1

    def running_for(self) -> float:
        """Seconds the longest-running predict has been running in its thread (0 when none runs)."""
        now = time.monotonic()
        return max((now - started for started in list(self._started.values())), default=0.0)

    async def predict(self, version: ModelVersion, image: Image, params: InferenceParams) -> Prediction:
        with STEPS.step("batch"):
            loop = asyncio.get_running_loop()
            key = (id(version), params, image.shape)
            batch = self._open.get(key)
            if batch is None:
                batch = self._open[key] = _Batch(version, params)
                if self.max_batch > 1 and self.max_wait_s > 0:
                    batch.timer = loop.call_later(self.max_wait_s, self._on_timer, key)
            future: asyncio.Future[Prediction] = loop.create_future()
            batch.images.append(image)
            batch.futures.append(future)
            if len(batch.images) >= self.max_batch or batch.timer is None:
                self._flush(key)
        return await future

    def _on_timer(self, key: BatchKey) -> None:
        if self._busy:
            self._due[key] = False
        else:
            self._flush(key)

    def _flush(self, key: BatchKey) -> None:
        self._due.pop(key, None)
        batch = self._open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self._busy += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        backend = batch.version.backend
        self.metrics.batch_size_of(batch.version.model).observe(len(batch.images))
        try:
            if backend is None:
                raise RuntimeError(f"{batch.version.model}/{batch.version.version} has no backend")
            results, compute_ms = await self.threads.run(self._predict, backend, batch.images, batch.params)
        except Exception as exc:  # every job of the batch gets the error
            for future in batch.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._busy -= 1
            self._run_due()
        with STEPS.step("batch"):
            self._observe(batch.version, len(batch.images), compute_ms)
            for future, detections in zip(batch.futures, results, strict=True):
                if not future.done():
                    future.set_result(detections)

    def _run_due(self) -> None:
        """At the end of a batch: the oldest batch that waited its time runs if the thread is now
        free, or if one batch end already passed it over; else it keeps filling meanwhile."""
        if not self._due:
            return
        key, passed_over = next(iter(self._due.items()))
        if self._busy and not passed_over:
            self._due[key] = True
        else:
            self._flush(key)

    def _observe(self, version: ModelVersion, size: int, compute_ms: float) -> None:
        runs = version.batches_run
        runs[size] = runs.get(size, 0) + 1
        if self.on_batch is not None and runs[size] > WARM_UP_BATCHES:
            self.on_batch(version, size, compute_ms)

    def _predict(
        self, backend: ModelBackend, images: Sequence[Image], params: InferenceParams
    ) -> tuple[list[Prediction], float]:
        # In the inference thread: the time it starts running, not the time it was queued, is what a
        # hang is measured from (`running_for`).
        thread = threading.get_ident()
        self._started[thread] = started = time.monotonic()
        try:
            results = backend.predict(images, params)
        finally:
            del self._started[thread]
        if len(results) != len(images):
            raise RuntimeError(f"the backend answered {len(results)} results for {len(images)} images")
        return results, (time.monotonic() - started) * 1000
