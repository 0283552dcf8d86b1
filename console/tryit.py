"""Try it: an uploaded image through the real pool, with the project's own client, once per version
asked for (two side by side), and each result drawn over the image by `control.annotate` (the one
drawing of every task: boxes and labels, masks, keypoints, landmarks, parts), as a PNG.

The upload is checked as the workers check it (`worker.runtime.images.read_header`) before any
job is published: what is not an image is refused here, with the worker's own words.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from aiohttp import web

from console.auth import refusal
from console.fleet import FleetView
from control.client import Client, ClientError, JobTimeout, NoRoute
from schemas.errors import JobFailure
from schemas.jobs import JobResult
from worker.runtime.images import ImageLimits, read_header

#: Versions compared side by side at most.
MAX_VERSIONS = 2


class TryIt:
    def __init__(self, client: Client, view: FleetView, *, max_bytes: int, max_pixels: int,
                 timeout_s: float) -> None:
        self.client = client
        self.view = view
        self.limits = ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels)
        self.timeout_s = timeout_s

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        model = form.get("model")
        upload = form.get("image")
        versions = [v.strip() for name in ("version", "version_b")
                    if isinstance(v := form.get(name), str) and v.strip()][:MAX_VERSIONS]
        serving = self.view.models()
        if not isinstance(model, str) or model not in serving:
            return refusal(404, f"unknown model {model!r}: no live worker serves it (serving: "
                                f"{', '.join(serving) or 'nothing'}); no job was sent")
        if not isinstance(upload, web.FileField):
            return refusal(400, "no image: choose or drop one (JPEG, PNG or WebP); no job was sent")
        data = upload.file.read()
        try:
            read_header(data, self.limits)
        except JobFailure as failure:
            return refusal(400, f"{upload.filename or 'the upload'} is not an image the pool takes "
                                f"({failure.code}: {failure.message}); no job was sent")
        try:
            asked: list[str | None] = [*versions] or [None]  # none named: as the traffic split routes it
            results = await asyncio.gather(*(self._one(data, model, version) for version in asked))
        except JobTimeout as exc:
            return refusal(504, str(exc))
        except NoRoute as exc:
            return refusal(404, f"{exc}; no job was sent")
        except ClientError as exc:
            return refusal(502, str(exc))
        return web.json_response({"results": results})

    async def _one(self, data: bytes, model: str, version: str | None) -> dict[str, Any]:
        result = await self.client.submit(data, model=model, version=version, timeout_s=self.timeout_s)
        drawn = await asyncio.to_thread(_drawn, data, result) if result.status == "ok" else None
        return {"asked": version or "(traffic split)", "result": json.loads(result.model_dump_json(exclude_none=True)),
                "png": drawn}


def _drawn(data: bytes, result: JobResult) -> str:
    import cv2  # OpenCV on the first image tried: `hotswap --help` never loads it

    from control.annotate import annotated

    ok, png = cv2.imencode(".png", annotated(data, result))
    if not ok:
        raise ValueError("the drawing could not be encoded as PNG")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")
