"""End to end through the real broker and a real worker (in the test's event loop: nothing here
needs a process of its own)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from control.client import Client, NoRoute
from schemas.errors import ErrorCode
from schemas.jobs import InferenceParams, JobResult
from schemas.topology import Topology
from worker.outputs import score_results

if TYPE_CHECKING:
    from conftest import HeldOut, Metric, Reference, SameAsReference, ServeInProcess


def png(size: tuple[int, int], noise: bool = False) -> bytes:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        picture = Image.fromarray(pixels)
    else:
        picture = Image.new("RGB", size, (90, 90, 90))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_held_out_images_come_back_right_and_equal_in_process_predict(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], zoo: Path, reference: Reference,
    same_as_reference: SameAsReference,
) -> None:
    await serve_in_process("shapes@2.0.0")
    results = await asyncio.gather(*(client.submit(item.path, model="shapes") for item in heldout))
    yolo = reference(zoo / "shapes" / "2.0.0")
    for item, result in zip(heldout, results, strict=True):
        assert (result.status, result.model, result.version) == ("ok", "shapes", "2.0.0")
        assert result.image is not None and (result.image.width, result.image.height) == (128, 128)
        same_as_reference(result, yolo.predict(str(item.path), imgsz=128, verbose=False)[0].boxes, item.path)
    score = score_results("detect", ((item.expected, result) for item, result in zip(heldout, results, strict=True)))
    assert score.recall >= 0.6, f"recall {score} on held-out shapes"  # 0.69 when built here


async def test_timings_and_identity_are_reported(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut]
) -> None:
    await serve_in_process("shapes@1.0.0", name="timed")
    result = await client.submit(heldout[0].path, model="shapes", version="1.0.0")
    t = result.timings
    assert result.worker_id == "timed" and result.attempt == 1
    assert t.queue_wait_ms is not None and t.queue_wait_ms >= 0
    assert 0 < t.decode_ms < t.total_ms and 0 < t.inference_ms < t.total_ms


async def test_every_bad_input_gets_its_own_code_and_the_worker_keeps_serving(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], namespace: str, amqp_url: str
) -> None:
    await serve_in_process("shapes@1.0.0", max_image_bytes=200_000, max_image_pixels=1_000_000)
    good = base64.b64encode(heldout[0].path.read_bytes()).decode()
    jpeg = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(jpeg, format="JPEG")
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()

    def job(**fields: object) -> bytes:
        body: dict[str, object] = {"job_id": "ignored", "model": "shapes", "image": {"data": good}}
        body.update(fields)
        return json.dumps({k: v for k, v in body.items() if v is not None}).encode()

    def inline(data: bytes) -> dict[str, str]:
        return {"data": base64.b64encode(data).decode()}

    cases: dict[ErrorCode, bytes] = {
        ErrorCode.INVALID_JSON: b"{this is not json",
        ErrorCode.INVALID_JOB: json.dumps({"job_id": "x", "model": "shapes", "image": 42}).encode(),
        ErrorCode.UNSUPPORTED_SCHEMA: job(schema_version=99),
        ErrorCode.MISSING_IMAGE: job(image=None),
        ErrorCode.BAD_BASE64: job(image={"data": "%%%"}),
        ErrorCode.INVALID_PARAMS: job(params={"conf": 7}),
        ErrorCode.NOT_AN_IMAGE: job(image=inline(b"GIF89a but not really")),
        ErrorCode.TRUNCATED_IMAGE: job(image=inline(jpeg.getvalue()[:400])),
        ErrorCode.EMPTY_IMAGE: job(image={"data": ""}),
        ErrorCode.IMAGE_TOO_LARGE: job(image=inline(png((300, 300), noise=True))),
        ErrorCode.TOO_MANY_PIXELS: job(image=inline(png((2000, 1000)))),
        ErrorCode.UNKNOWN_MODEL: job(model="other"),
        ErrorCode.UNKNOWN_VERSION: job(version="9.9.9"),
        ErrorCode.EXPIRED: job(deadline=past),
    }
    results = await asyncio.gather(
        *(client.submit_raw(body, model="shapes", job_id=f"bad-{code}") for code, body in cases.items())
    )
    for (code, _), result in zip(cases.items(), results, strict=True):
        assert result.status == "error" and result.error is not None
        assert result.error.code is code, f"{code}: {result.error}"
        assert result.error.message
        # The body's job id when it has one, else the correlation id it was published under.
        body_job_id = {ErrorCode.INVALID_JSON: "bad-invalid_json", ErrorCode.INVALID_JOB: "x"}
        assert result.job_id == body_job_id.get(code, "ignored")

    # No reply_to: nobody to answer, so straight to the dead-letter queue.
    topology = Topology(namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.jobs_exchange)
        await exchange.publish(aio_pika.Message(job(job_id="no-reply-to")), routing_key="shapes")

        ok = await client.submit(heldout[1].path, model="shapes")
        assert ok.status == "ok" and ok.detections

        dead_queue = await channel.declare_queue(topology.dead_letter_queue("shapes"), passive=True)
        dead = await _drain(dead_queue)
    malformed = {"bad-invalid_json", "bad-invalid_job", "bad-unsupported_schema", "bad-missing_image",
                 "bad-bad_base64", "bad-invalid_params"}
    assert {m.correlation_id or json.loads(m.body)["job_id"] for m in dead} == malformed | {"no-reply-to"}


async def _drain(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    for _ in range(100):
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            if messages:
                return messages
            await asyncio.sleep(0.1)
            continue
        messages.append(message)
    return messages


async def test_a_model_nobody_serves_is_refused_at_the_client(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut]
) -> None:
    await serve_in_process("shapes@1.0.0")
    with pytest.raises(NoRoute, match="nobody"):
        await client.submit(heldout[0].path, model="nobody")


async def test_a_pinned_version_is_honoured(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut]
) -> None:
    await serve_in_process("shapes@1.0.0")
    result = await client.submit(heldout[0].path, model="shapes", version="1.0.0", params=InferenceParams(conf=0.5))
    assert (result.status, result.version) == ("ok", "1.0.0")
    assert all(d.score >= 0.5 for d in result.detections)


async def test_images_by_url(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], tmp_path: Path
) -> None:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=heldout[0].path.read_bytes(), content_type="image/png")

    app = web.Application()
    app.router.add_get("/image.png", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    image_dir = heldout[0].path.parent
    # This server's host and port only; its address is loopback, so that network must be allowed too.
    worker = await serve_in_process(
        "shapes@1.0.0", image_file_roots=[image_dir], image_url_hosts=[f"127.0.0.1:{port}"],
        image_url_networks=["127.0.0.0/8"],
    )
    outside = tmp_path / "outside.png"
    outside.write_bytes(heldout[0].path.read_bytes())
    try:
        by_http, by_file, refused, own_status = await asyncio.gather(
            client.submit(f"http://127.0.0.1:{port}/image.png", model="shapes"),
            client.submit(f"file://{heldout[0].path}", model="shapes"),
            client.submit(f"file://{outside}", model="shapes"),
            client.submit(worker.url + "/metrics", model="shapes"),  # same host, another port
        )
    finally:
        await runner.cleanup()
    inline = await client.submit(heldout[0].path, model="shapes")
    assert by_http.status == by_file.status == "ok", (by_http.error, by_file.error)
    # The same pixels; batching may differ in the last float bits.
    def rounded(result: JobResult) -> list[tuple[object, ...]]:
        return [(d.class_id, round(d.score, 4), round(d.box.x1, 2), round(d.box.y2, 2)) for d in result.detections]

    assert rounded(by_http) == rounded(by_file) == rounded(inline)
    for result in (refused, own_status):
        assert result.error is not None and result.error.code is ErrorCode.IMAGE_URL_REFUSED, result.error


async def test_image_urls_are_refused_by_default(
    serve_in_process: ServeInProcess, client: Client, metric: Metric
) -> None:
    # A worker fetching whatever a producer names would fetch its own metrics, and worse.
    worker = await serve_in_process("shapes@1.0.0")
    result = await client.submit(worker.url + "/metrics", model="shapes")
    assert result.error is not None and result.error.code is ErrorCode.IMAGE_URL_REFUSED, result.error
    assert "HOTSWAP_IMAGE_URL_HOSTS" in result.error.message
    assert metric(await worker.text("/metrics"), "hotswap_jobs_total", code="image_url_refused") == 1


async def test_the_pixel_budget_bounds_the_images_held_at_once(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    # Room for one 128×128 image: however many jobs are in flight, each batch holds one image.
    worker = await serve_in_process("shapes@1.0.0", max_pixels_in_flight=128 * 128)
    results = await asyncio.gather(*(client.submit(h.path, model="shapes") for h in heldout[:24]))
    assert all(r.status == "ok" for r in results)
    exposition = await worker.text("/metrics")
    assert metric(exposition, "hotswap_batch_size_sum", model="shapes") == 24
    assert metric(exposition, "hotswap_batch_size_count", model="shapes") == 24
    assert metric(exposition, "hotswap_decoded_pixels_held") == 0
