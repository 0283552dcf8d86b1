"""Every delivery settles (invariant 9): whatever stage of a job raises, the delivery ends as an
error result then an ack or a dead letter, or goes back to its queue; the worker keeps serving.

A whole worker runs in the test's event loop against the real broker, so that each stage can be
made to fail the way a bug would: with an exception nobody expected.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest

import worker.jobs as jobs_module  # the module whose names the job path looks up at call time
from control.client import Client
from schemas.control import Shadow
from schemas.errors import ErrorCode
from schemas.jobs import JobResult, UrlImage
from schemas.topology import Topology
from worker.admission import PixelBudget
from worker.app import Worker
from worker.consumer import JobConsumer
from worker.jobs import JobProcessor
from worker.runtime import validation
from worker.runtime.desired import DesiredState
from worker.runtime.trivial_backend import TrivialBackend

if TYPE_CHECKING:
    from conftest import HeldOut, ServeInProcess

pytestmark = pytest.mark.slow


class Bug(RuntimeError):
    """What a bug raises: nothing in the job path expects it."""


def failing(times: int | None = None) -> Callable[..., Any]:
    """A stand-in for a function or method that raises `Bug` (the first `times` calls, or always)
    and otherwise does what the original does."""
    calls = itertools.count()

    def install(original: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(original):
            async def async_stub(*args: Any, **kwargs: Any) -> Any:
                if times is None or next(calls) < times:
                    raise Bug("boom /secret/path/in/a/traceback")
                return await original(*args, **kwargs)
            return async_stub

        def stub(*args: Any, **kwargs: Any) -> Any:
            if times is None or next(calls) < times:
                raise Bug("boom /secret/path/in/a/traceback")
            return original(*args, **kwargs)
        return stub

    return install


@dataclass(frozen=True)
class Stage:
    target: object  # module or class holding the attribute to break
    attribute: str
    code: ErrorCode | None  # the error result's code; None: the job succeeds after a requeue
    dead_letter: bool = False
    times: int | None = None  # fail this many calls only (then the retry goes through)
    by_url: bool = False  # the job names its image by file:// URL (so that fetching runs)


STAGES = {
    "parse": Stage(jobs_module, "parse_job", ErrorCode.INTERNAL, dead_letter=True),
    "route": Stage(JobProcessor, "_route", ErrorCode.INTERNAL, dead_letter=True),
    "fetch": Stage(jobs_module, "fetch_image", ErrorCode.INTERNAL, dead_letter=True, by_url=True),
    "header": Stage(jobs_module, "read_header", ErrorCode.INTERNAL, dead_letter=True),
    "decode": Stage(jobs_module, "decode_pixels", ErrorCode.INTERNAL, dead_letter=True),
    "admission": Stage(PixelBudget, "hold", ErrorCode.INTERNAL, dead_letter=True),
    "inference": Stage(TrivialBackend, "predict", ErrorCode.INFERENCE_FAILED),
    "publish": Stage(JobConsumer, "_publish_result", None, times=1),
    "settle": Stage(JobConsumer, "_settle", None, times=1),
}


async def dead_letters(amqp_url: str, namespace: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology(namespace).dead_letter_queue("trivial"), passive=True)
        return queue.declaration_result.message_count or 0


async def settled(worker: Worker) -> None:
    """Wait until the worker holds no job and every delivery it received is settled."""
    assert worker.consumer is not None
    async with asyncio.timeout(10):
        while worker.consumer.in_flight or worker.consumer.acks.unsettled_count:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("name", list(STAGES))
async def test_an_unexpected_exception_in_any_stage_settles_the_delivery(
    name: str, serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], amqp_url: str, namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stage = STAGES[name]
    image_dir = heldout[0].path.parent
    worker = await serve_in_process(image_file_roots=[image_dir])
    image = UrlImage(url=f"file://{heldout[0].path}") if stage.by_url else heldout[0].path
    monkeypatch.setattr(stage.target, stage.attribute, failing(stage.times)(getattr(stage.target, stage.attribute)))

    result = await client.submit(image, model="trivial", timeout_s=30)
    await settled(worker)
    if stage.code is None:  # requeued, then answered on the next delivery
        assert (result.status, result.attempt) == ("ok", 2), result
    else:
        assert result.status == "error" and result.error is not None
        assert result.error.code is stage.code, result.error
        assert "Traceback" not in result.error.message and "\n" not in result.error.message
        if stage.code is ErrorCode.INTERNAL:  # a bug's own words (paths, data) stay in the log
            assert "/secret/" not in result.error.message and "Bug" in result.error.message
    assert await dead_letters(amqp_url, namespace) == int(stage.dead_letter)

    monkeypatch.undo()
    after = await client.submit(heldout[1].path, model="trivial", timeout_s=10)
    assert after.status == "ok" and after.detections, after
    await settled(worker)
    assert worker.consumer is not None and worker.consumer.acks.unsettled_count == 0
    assert not worker.not_ready_reasons()


async def test_a_failing_shadow_leaves_its_primary_and_the_next_job_alone(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await serve_in_process()
    await worker.models.reconcile(DesiredState("trivial", active="1.0.0", shadow=Shadow(version="2.0.0", percent=100)))
    monkeypatch.setattr(jobs_module, "evaluator_for", failing()(validation.evaluator_for))
    results = await asyncio.gather(*(client.submit(h.path, model="trivial") for h in heldout[:8]))
    assert all((r.status, r.version) == ("ok", "1.0.0") for r in results)
    await settled(worker)
    assert worker.processor is not None
    async with asyncio.timeout(5):
        while worker.processor.shadows_in_flight:
            await asyncio.sleep(0.02)
    assert worker.processor.pixels.held == 0, "a failed shadow run kept its pixels"


async def test_a_result_that_cannot_be_encoded_sends_its_job_back_until_the_delivery_limit(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], amqp_url: str, namespace: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: a result that fails on its way out (here: always) requeues the
    job; the quorum queue's delivery limit then dead-letters it, and nothing stays unacked."""
    worker = await serve_in_process(delivery_limit=2)
    monkeypatch.setattr(JobResult, "model_dump_json", failing()(JobResult.model_dump_json))
    job = client.build_job(heldout[0].path, model="trivial")
    body = job.model_dump_json().encode()
    await client.publish_raw(body, model="trivial", job_id=job.job_id)
    async with asyncio.timeout(20):
        while await dead_letters(amqp_url, namespace) < 1:
            await asyncio.sleep(0.1)
    await settled(worker)
    monkeypatch.undo()
    after = await client.submit(heldout[1].path, model="trivial", timeout_s=10)
    assert after.status == "ok"
