"""Try it: an image through the real pool, drawn by control/annotate.py, two versions side by side."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import cv2
import numpy as np
from console_support import http, row, running_console, sign_in, wait_for_state

from control.annotate import annotated
from control.operator import Operator
from schemas.control import Update
from schemas.jobs import JobResult
from schemas.signing import KeyFiles

if TYPE_CHECKING:
    from conftest import ServeInProcess


def _image(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def _png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return _image(base64.b64decode(data_url.split(",", 1)[1]))


async def test_two_versions_side_by_side_each_drawn_with_its_timings(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator,
    bus_jpg: Path
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-try")
    standby = await operator.publish_and_wait("trivial", Update(version="2.0.0", activate="standby"), timeout_s=30)
    assert standby.ok, standby.failures
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        csrf = await sign_in(session, console.url)
        await wait_for_state(session, console.url, lambda s: row(s, "w-try", "trivial") is not None)
        form = aiohttp.FormData({"model": "trivial", "version": "1.0.0", "version_b": "2.0.0"})
        form.add_field("image", bus_jpg.read_bytes(), filename="bus.jpg", content_type="image/jpeg")
        async with session.post(console.url + "/api/try", data=form, headers={"X-CSRF-Token": csrf}) as response:
            assert response.status == 200, await response.text()
            results = (await response.json())["results"]
    assert [(r["asked"], r["result"]["version"], r["result"]["worker_id"]) for r in results] == [
        ("1.0.0", "1.0.0", "w-try"), ("2.0.0", "2.0.0", "w-try")]
    plain = _image(bus_jpg.read_bytes())
    for r in results:
        result = JobResult.model_validate(r["result"])
        assert result.status == "ok" and result.timings.total_ms > 0
        assert [d.class_name for d in result.detections] == ["thing"]  # the trivial model's whole-image box
        drawn = _png(r["png"])
        assert drawn.shape == plain.shape  # big enough already: drawn at its own size
        assert not np.array_equal(drawn, plain)  # with something drawn on it
        assert np.array_equal(drawn, annotated(bus_jpg.read_bytes(), result))  # by the one drawing code
