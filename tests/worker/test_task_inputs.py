"""One worker serving every small family: each answers its task's output through the same job path,
and wrong inputs get the same error codes whatever the task."""

from __future__ import annotations

import base64
import json
import struct
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from control.client import Client
from schemas.errors import ErrorCode
from schemas.outputs import DetectOutput, FaceOutput, ParsingOutput, PoseOutput, SegmentOutput

if TYPE_CHECKING:
    from conftest import HeldOut, ServeInProcess

pytestmark = pytest.mark.slow

MODELS = {"shapes": DetectOutput, "shapes-seg": SegmentOutput, "shapes-pose": PoseOutput, "faces": FaceOutput,
          "faces-mtcnn": FaceOutput, "parsing": ParsingOutput}


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_jobs(model: str, good: bytes) -> dict[str, tuple[bytes, ErrorCode]]:
    def job(**fields: object) -> bytes:
        body = {"job_id": uuid.uuid4().hex, "model": model, "image": {"data": base64.b64encode(good).decode()},
                **fields}
        return json.dumps(body).encode()

    def inline(data: bytes) -> dict[str, str]:
        return {"data": base64.b64encode(data).decode()}

    return {
        "not json": (b"{nope", ErrorCode.INVALID_JSON),
        "bad base64": (job(image={"data": "%%%"}), ErrorCode.BAD_BASE64),
        "not an image": (job(image=inline(b"GIF89a, not really" * 8)), ErrorCode.NOT_AN_IMAGE),
        "truncated": (job(image=inline(good[: len(good) // 2])), ErrorCode.TRUNCATED_IMAGE),
        "pixel bomb": (job(image=inline(_png_claiming(100_000, 100_000))), ErrorCode.TOO_MANY_PIXELS),
        "params": (job(params={"conf": 7}), ErrorCode.INVALID_PARAMS),
        "unknown version": (job(version="9.9.9"), ErrorCode.UNKNOWN_VERSION),
        "private url": (job(image={"url": "http://169.254.169.254/latest"}), ErrorCode.IMAGE_URL_REFUSED),
    }


async def test_every_family_answers_its_task_and_refuses_bad_inputs_alike(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], bus_jpg: Path
) -> None:
    await serve_in_process(*MODELS, name="all")
    codes: dict[str, dict[str, ErrorCode | None]] = {}
    for model, output in MODELS.items():
        for image in (heldout[0].path, bus_jpg):
            result = await client.submit(image, model=model)
            assert result.status == "ok" and isinstance(result.output, output), (model, result.error)
        good = heldout[0].path.read_bytes()
        codes[model] = {}
        for kind, (body, expected) in _bad_jobs(model, good).items():
            job_id = json.loads(body)["job_id"] if body.startswith(b'{"') else uuid.uuid4().hex
            answer = await client.submit_raw(body, model=model, job_id=job_id, timeout_s=30)
            codes[model][kind] = answer.error.code if answer.error else None
            assert codes[model][kind] == expected, (model, kind, answer.error)
    assert all(per_model == codes["shapes"] for per_model in codes.values())
