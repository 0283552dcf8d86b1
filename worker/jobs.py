"""From a message body to a job result: parse, route, fetch, decode, infer.

Transport-free: `worker.consumer` hands a body in and publishes what comes out. Every failure
becomes a result with a specific error code; an exception nobody expected (a bug, here or in a
library) becomes an `internal` error result naming no more than the exception's type (the
traceback goes to the log, never on the wire), and the message is dead-lettered for inspection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from schemas.errors import MALFORMED, ErrorCode, JobFailure
from schemas.jobs import (
    Detection,
    ImageInfo,
    InlineImage,
    Job,
    JobError,
    JobResult,
    Timings,
    parse_job,
)
from schemas.manifest import Manifest
from schemas.outputs import TaskOutput
from schemas.status import LastError
from worker.admission import PixelBudget
from worker.batching import MicroBatcher
from worker.evidence import Evidence
from worker.fetch import fetch_image
from worker.logs import log_context
from worker.metrics import WorkerMetrics
from worker.outputs import to_wire
from worker.runtime.backend import Image
from worker.runtime.deployment import Deployment, DeploymentTable, UnknownVersion
from worker.runtime.images import ImageHeader, ImageLimits, decode_pixels, read_header
from worker.runtime.lifecycle import ModelVersion
from worker.runtime.predictions import Prediction
from worker.runtime.profiling import STEPS
from worker.runtime.validation import evaluator_for
from worker.threads import LoopThreads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What the processor needs from an AMQP delivery."""

    body: bytes
    queue_model: str
    reply_to: str | None
    correlation_id: str | None
    attempt: int


@dataclass(frozen=True)
class Outcome:
    result: JobResult
    #: Publish the result here; None when the message named no reply queue.
    reply_to: str | None
    #: Malformed messages go to the dead-letter queue after their error result.
    dead_letter: bool


@dataclass
class JobStats:
    done: int = 0
    failed: int = 0
    last_error: LastError | None = None

    def record(self, result: JobResult) -> None:
        if result.error is None:
            self.done += 1
            return
        self.failed += 1
        self.last_error = LastError(job_id=result.job_id, code=result.error.code.value,
                                    message=result.error.message, at=datetime.now(UTC))


class _Clock:
    """Wall-clock phases of one job, in milliseconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.received_at = datetime.now(UTC)
        self.decode_ms = 0.0
        self.inference_ms = 0.0

    def timings(self, submitted_at: datetime | None) -> Timings:
        wait = None
        if submitted_at is not None:
            wait = max(0.0, (self.received_at - submitted_at).total_seconds() * 1000)
        return Timings(
            queue_wait_ms=wait,
            decode_ms=self.decode_ms,
            inference_ms=self.inference_ms,
            total_ms=(time.perf_counter() - self.start) * 1000,
        )


class JobProcessor:
    def __init__(
        self,
        worker_id: str,
        deployments: DeploymentTable,
        limits: ImageLimits,
        decode_threads: LoopThreads,
        batcher: MicroBatcher,
        pixels: PixelBudget,
        http: aiohttp.ClientSession,
        metrics: WorkerMetrics,
        *,
        max_shadows: int = 16,
        evidence: Evidence | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.deployments = deployments
        self.limits = limits
        self.decode_threads = decode_threads
        self.batcher = batcher
        self.pixels = pixels
        self.http = http
        self.metrics = metrics
        self.stats = JobStats()
        self.evidence = evidence or Evidence()
        self.max_shadows = max_shadows
        self._shadows: set[asyncio.Task[None]] = set()

    async def process(self, delivery: Delivery) -> Outcome:
        """The outcome of one delivery; never raises an Exception."""
        clock = _Clock()
        # The correlation id names the job until its body is parsed: lines about a job too
        # malformed to parse still say which one it was.
        with log_context(job_id=delivery.correlation_id, model=delivery.queue_model, attempt=delivery.attempt):
            try:
                return await self._process(delivery, clock)
            except Exception as exc:
                log.exception("unexpected failure handling a job from %s", delivery.queue_model)
                message = f"the worker failed unexpectedly on this job ({type(exc).__name__}); it has been logged"
                result = self._error(delivery.correlation_id or "unknown", delivery, clock, None, None,
                                     ErrorCode.INTERNAL, message)
                return self._finish(result, delivery, dead_letter=True)

    @property
    def shadows_in_flight(self) -> int:
        return len(self._shadows)

    async def _process(self, delivery: Delivery, clock: _Clock) -> Outcome:
        try:
            with STEPS.step("parse"):
                job = parse_job(delivery.body)
        except JobFailure as exc:
            job_id = exc.job_id or delivery.correlation_id or "unknown"
            result = self._error(job_id, delivery, clock, None, None, exc.code, exc.message)
            return self._finish(result, delivery)
        if not delivery.reply_to:
            message = "the message has no reply_to property, so its result has nowhere to go"
            result = self._error(job.job_id, delivery, clock, job, None, ErrorCode.MISSING_REPLY_TO, message)
            return self._finish(result, delivery)
        # Lines already name the job when its id is the correlation id (clients publish it so):
        # a field of None adds nothing, and costs nothing.
        with log_context(job_id=None if job.job_id == delivery.correlation_id else job.job_id):
            return await self._serve(job, delivery, clock)

    async def _serve(self, job: Job, delivery: Delivery, clock: _Clock) -> Outcome:
        try:
            deployment, version = await self._route(job)
        except JobFailure as exc:
            return self._finish(self._error(job.job_id, delivery, clock, job, None, exc.code, exc.message), delivery)
        result = await self._attempt(job, deployment, version, delivery, clock)
        if _canary_failed(job, deployment, version, result) and (current := self.deployments.get(job.model)):
            # The canary's failure is evidence for its rollout (counted above), not the producer's
            # problem: the job runs again on the version that serves everyone else.
            result = await self._attempt(job, current, current.active, delivery, clock)
        return self._finish(result, delivery)

    async def _attempt(
        self, job: Job, deployment: Deployment, version: ModelVersion, delivery: Delivery, clock: _Clock
    ) -> JobResult:
        version.in_flight += 1  # no await since the route was found: nothing can free it in between
        try:
            result = await self._run(job, deployment, version, delivery, clock)
        except JobFailure as exc:
            result = self._error(job.job_id, delivery, clock, job, version, exc.code, exc.message)
        finally:
            version.in_flight -= 1
        # The version's own record, for rollouts (its batches' times come from the batcher).
        self.evidence.served(version.model, version.version, result.error.code if result.error else None)
        return result

    async def _route(self, job: Job) -> tuple[Deployment, ModelVersion]:
        with STEPS.step("route"):
            _check_deadline(job)
            deployment = self.deployments.get(job.model)  # the snapshot this job keeps to the end
            if deployment is None:
                raise JobFailure(ErrorCode.UNKNOWN_MODEL, f"this worker does not serve model {job.model!r}")
            try:
                return deployment, deployment.resolve(job.version, _routing_key(job))
            except UnknownVersion as exc:
                loader = self.deployments.on_demand
                if job.version is None or loader is None or not loader.allows(job.model, job.version):
                    raise JobFailure(ErrorCode.UNKNOWN_VERSION, str(exc)) from exc
        # A version allowed on demand: this job waits for it to load (or joins the load under way).
        version = await loader.acquire(job.model, job.version)
        return self.deployments.get(job.model) or deployment, version

    async def _run(
        self, job: Job, deployment: Deployment, version: ModelVersion, delivery: Delivery, clock: _Clock
    ) -> JobResult:
        header = await self._header(job)
        async with self.pixels.hold(header.pixels):  # from decoding until inference is done
            image = await self._decode(header, clock)
            _check_deadline(job)
            prediction = await self._infer(version, image, job, clock)
        shadow = deployment.shadow_for(_routing_key(job), version)
        if shadow is not None:
            self._start_shadow(shadow, version, image, header.pixels, job, prediction)
        detections, output = await self._encode(prediction, version)
        with STEPS.step("result"):
            return JobResult(
                job_id=job.job_id,
                status="ok",
                model=version.model,
                version=version.version,
                worker_id=self.worker_id,
                attempt=delivery.attempt,
                timings=clock.timings(job.submitted_at),
                image=ImageInfo(width=image.shape[1], height=image.shape[0]),
                detections=detections,
                output=output,
            )

    async def _encode(self, prediction: Prediction, version: ModelVersion) -> tuple[list[Detection], TaskOutput]:
        """The result's detections and output. Masks are run-length encoded in a decode thread:
        a parsing answer on a photo is millions of pixels, too many for the event loop."""
        if prediction.masks is None and prediction.parts is None:
            with STEPS.step("encode"):
                return to_wire(prediction, version.loaded_manifest)
        return await self.decode_threads.run(_timed_to_wire, prediction, version.loaded_manifest)

    async def _header(self, job: Job) -> ImageHeader:
        if isinstance(job.image, InlineImage):
            data = job.image.data
        else:
            data = await fetch_image(job.image.url, self.limits, self.http)
        with STEPS.step("header"):
            return read_header(data, self.limits)  # on the loop: microseconds, no pixel decoded

    async def _decode(self, header: ImageHeader, clock: _Clock) -> Image:
        started = time.perf_counter()
        image = _timed_decode(header) if header.cheap else await self.decode_threads.run(_timed_decode, header)
        clock.decode_ms = (time.perf_counter() - started) * 1000
        return image

    async def _infer(self, version: ModelVersion, image: Image, job: Job, clock: _Clock) -> Prediction:
        started = time.perf_counter()
        try:
            prediction = await self.batcher.predict(version, image, job.params)
        except Exception as exc:  # a model failure is this job's error, not the worker's
            raise JobFailure(ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}") from exc
        clock.inference_ms = (time.perf_counter() - started) * 1000  # its batch's wait included
        return prediction

    def _start_shadow(
        self, shadow: ModelVersion, primary: ModelVersion, image: Image, pixels: int, job: Job,
        prediction: Prediction,
    ) -> None:
        """Run the job on the shadow version too, after the primary; only the agreement is kept.

        Shadow work is optional: it is dropped (and counted) rather than queued whenever it would
        delay primary jobs: too many shadows running, batches waiting for the inference thread, or
        no room in the pixel budget right now."""
        dropped = self._admit_shadow(pixels)
        if dropped is not None:
            self.metrics.shadow_dropped.labels(job.model, shadow.version, dropped).inc()
            return
        shadow.in_flight += 1  # keeps the shadow version from being freed under this run

        async def run() -> None:
            try:
                theirs = await self.batcher.predict(shadow, image, job.params)
                # Mask IoU over whole images is milliseconds of numpy: off the event loop.
                evaluator = evaluator_for(primary.loaded_manifest)
                ratio = await self.decode_threads.run(evaluator.agreement, prediction, theirs)
                self.metrics.shadow_agreement.labels(job.model, primary.version, shadow.version).observe(ratio)
                self.evidence.shadowed(job.model, primary.version, shadow.version, ratio)
            except Exception as exc:  # a shadow failure is recorded, never the producer's problem
                log.warning("shadow run on %s/%s failed: %s", shadow.model, shadow.version, exc)
                self.evidence.shadowed(job.model, primary.version, shadow.version, None)
            finally:
                shadow.in_flight -= 1
                self.pixels.release(pixels)

        task = asyncio.create_task(run())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    def _admit_shadow(self, pixels: int) -> str | None:
        """None when the shadow may run, its pixels now held (released when it ends); else why not."""
        if len(self._shadows) >= self.max_shadows:
            return "limit"
        if self.batcher.backlogged:
            return "backlog"
        if not self.pixels.try_acquire(pixels):
            return "pixels"
        return None

    def _error(
        self,
        job_id: str,
        delivery: Delivery,
        clock: _Clock,
        job: Job | None,
        version: ModelVersion | None,
        code: ErrorCode,
        message: str,
    ) -> JobResult:
        return JobResult(
            job_id=job_id,
            status="error",
            model=version.model if version else (job.model if job else delivery.queue_model),
            version=version.version if version else None,
            worker_id=self.worker_id,
            attempt=delivery.attempt,
            timings=clock.timings(job.submitted_at if job else None),
            error=JobError(code=code, message=message),
        )

    def _finish(self, result: JobResult, delivery: Delivery, *, dead_letter: bool = False) -> Outcome:
        with STEPS.step("bookkeeping"):
            return self._account(result, delivery, dead_letter)

    def _account(self, result: JobResult, delivery: Delivery, dead_letter: bool) -> Outcome:
        self.stats.record(result)
        _log_answer(result)
        code = result.error.code if result.error else None
        model = result.model or delivery.queue_model
        self.metrics.jobs_of(model, result.version or "", result.status, code or "").inc()
        timings = result.timings
        phases = self.metrics.phase_of
        if timings.queue_wait_ms is not None:
            phases(model, "queue_wait").observe(timings.queue_wait_ms / 1000)
        if result.status == "ok":
            phases(model, "decode").observe(timings.decode_ms / 1000)
            phases(model, "inference").observe(timings.inference_ms / 1000)
        phases(model, "total").observe(timings.total_ms / 1000)
        return Outcome(
            result=result,
            reply_to=delivery.reply_to or None,
            dead_letter=dead_letter or code in MALFORMED,
        )


def _timed_decode(header: ImageHeader) -> Image:
    # In a decode thread, or on the loop for a cheap image. `decode_pixels` is looked up at each
    # call, not bound once: a test that replaces it (tests/worker/test_consumer.py) must reach
    # this call too.
    with STEPS.step("decode"):
        return decode_pixels(header)


def _timed_to_wire(prediction: Prediction, manifest: Manifest) -> tuple[list[Detection], TaskOutput]:
    with STEPS.step("encode"):  # in a decode thread, for masks
        return to_wire(prediction, manifest)


def _log_answer(result: JobResult) -> None:
    """A line per answer, with the job's fields: an error at INFO, a success at DEBUG (`-v`), since
    a line per job would cost the busiest path more than it tells."""
    level = logging.DEBUG if result.error is None else logging.INFO
    if not log.isEnabledFor(level):
        return
    fields = {"job_id": result.job_id, "version": result.version, "status": result.status,
              "code": result.error.code.value if result.error else None, "total_ms": round(result.timings.total_ms, 2)}
    log.log(level, "job %s answered %s%s", result.job_id, result.status,
            f" ({result.error.code.value}: {result.error.message})" if result.error else "",
            extra={k: v for k, v in fields.items() if v is not None})


def _canary_failed(job: Job, deployment: Deployment, version: ModelVersion, result: JobResult) -> bool:
    """The model failed a job that traffic weights, not the job's pin, sent to another version than the active one."""
    code = result.error.code if result.error else None
    return code == ErrorCode.INFERENCE_FAILED and job.version is None and version is not deployment.active


def _routing_key(job: Job) -> str:
    return job.routing_key or job.job_id


def _check_deadline(job: Job) -> None:
    if job.deadline is not None and datetime.now(UTC) >= job.deadline:
        raise JobFailure(ErrorCode.EXPIRED, f"the job's deadline {job.deadline.isoformat()} has passed")
