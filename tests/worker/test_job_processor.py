"""The job processor's own rules, on a whole worker in the test's event loop: called with deliveries
directly (no broker between), and through the broker where the rule is about jobs in flight."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest

import worker.jobs as jobs_module
import worker.runtime.images as images_module
from control.client import Client
from schemas.control import Shadow
from schemas.errors import ErrorCode
from schemas.jobs import InlineImage, Job
from worker.app import Worker
from worker.jobs import Delivery
from worker.runtime.backend import Image
from worker.runtime.desired import DesiredState
from worker.runtime.images import ImageHeader
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, ServeInProcess

def dropped(worker: Worker, reason: str) -> float:
    return sum(sample.value for family in worker.metrics.registry.collect() for sample in family.samples
               if sample.name == "hotswap_shadow_dropped_total" and sample.labels["reason"] == reason)


@pytest.mark.slow
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


def _job(heldout: HeldOut, **fields: object) -> bytes:
    job = Job(job_id=str(fields.pop("job_id", "j1")), model=str(fields.pop("model", "trivial")),
              image=InlineImage(data=heldout.path.read_bytes()), **fields)
    return job.model_dump_json().encode()


def _delivery(body: bytes, *, reply_to: str | None = "replies", attempt: int = 1) -> Delivery:
    return Delivery(body=body, queue_model="trivial", reply_to=reply_to, correlation_id="corr", attempt=attempt)


async def test_the_processor_answers_each_delivery_with_its_outcome(
    serve_in_process: ServeInProcess, heldout: list[HeldOut]
) -> None:
    """The processor alone, called with deliveries (no broker between): what each outcome says."""
    worker = await serve_in_process("trivial@1.0.0", "trivial@2.0.0")
    processor = worker.processor
    assert processor is not None
    past = datetime.now(UTC) - timedelta(seconds=1)
    cases: list[tuple[Delivery, ErrorCode | None, bool]] = [
        (_delivery(_job(heldout[0]), attempt=3), None, False),
        (_delivery(_job(heldout[0], version="2.0.0")), None, False),  # pinned, whichever is active
        (_delivery(b"{not json"), ErrorCode.INVALID_JSON, True),
        (_delivery(b'{"job_id": "j2", "model": "trivial"}'), ErrorCode.MISSING_IMAGE, True),
        (_delivery(_job(heldout[0]), reply_to=None), ErrorCode.MISSING_REPLY_TO, True),
        (_delivery(_job(heldout[0], model="nobody")), ErrorCode.UNKNOWN_MODEL, False),
        (_delivery(_job(heldout[0], version="9.9.9")), ErrorCode.UNKNOWN_VERSION, False),
        (_delivery(_job(heldout[0], deadline=past)), ErrorCode.EXPIRED, False),
    ]
    outcomes = [await processor.process(delivery) for delivery, _, _ in cases]
    for (delivery, code, dead_letter), outcome in zip(cases, outcomes, strict=True):
        result = outcome.result
        assert (result.error.code if result.error else None) == code, result
        assert outcome.dead_letter is dead_letter, (code, outcome)
        assert outcome.reply_to == delivery.reply_to
        assert result.attempt == delivery.attempt and result.worker_id == worker.settings.worker_id
    ok, pinned = outcomes[0].result, outcomes[1].result
    assert (ok.status, ok.model, ok.version) == ("ok", "trivial", worker.status().models["trivial"].active)
    assert ok.image is not None and (ok.image.width, ok.image.height) == (128, 128)
    assert len(ok.detections) == 1 and ok.detections[0].box.x2 == 128  # the trivial model's whole-image box
    assert pinned.version == "2.0.0"
    assert outcomes[2].result.job_id == "corr"  # unparsable: the correlation id names it
    assert outcomes[3].result.job_id == "j2"  # parsed far enough to read its id
    assert processor.stats.done == 2 and processor.stats.failed == len(cases) - 2


async def test_small_images_are_decoded_on_the_loop_and_the_others_in_a_decode_thread(
    serve_in_process: ServeInProcess, heldout: list[HeldOut], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing a decode to a thread and back costs more than decoding a 64 × 64 image."""
    worker = await serve_in_process("trivial@1.0.0")
    processor = worker.processor
    assert processor is not None
    decoded_in: list[str] = []
    decode = images_module.decode_pixels

    def recorded(header: ImageHeader) -> Image:
        decoded_in.append(threading.current_thread().name)
        return decode(header)

    monkeypatch.setattr(jobs_module, "decode_pixels", recorded)
    sizes = [(64, 64), (64, 65)]
    paths = [tmp_path / f"{w}x{h}.png" for w, h in sizes]
    for path, (width, height) in zip(paths, sizes, strict=True):
        cv2.imwrite(str(path), np.full((height, width, 3), 200, np.uint8))
    for path in (*paths, heldout[0].path):
        body = Job(job_id="j", model="trivial", image=InlineImage(data=path.read_bytes())).model_dump_json().encode()
        assert (await processor.process(_delivery(body))).result.status == "ok"
    loop_thread, *others = decoded_in
    assert loop_thread == threading.current_thread().name  # the test's loop is the worker's
    assert len(others) == 2 and all(name.startswith("decode_") for name in others), decoded_in
