"""Thousands of hostile messages, as any AMQP client could send them, to one worker process: each
gets its specific answer (or its dead letter), nothing is left unacked, and the worker stays
ready and answers a good job at once."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aio_pika
import pytest

from control.client import Client
from schemas.errors import MALFORMED, ErrorCode
from schemas.jobs import JobResult
from schemas.topology import Topology

if TYPE_CHECKING:
    from conftest import DeadLetters, HeldOut, ServeInProcess

pytestmark = pytest.mark.slow

MESSAGES = 3000


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge picture (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(
        b"IEND", b"")


def hostile_bodies(good_png: bytes, status_url: str) -> Iterator[tuple[str, bytes, frozenset[ErrorCode] | None]]:
    """(kind, body, acceptable codes); codes None: the message names no reply queue (dead letter only)."""

    def job(**fields: object) -> bytes:
        body: dict[str, object] = {"job_id": "from-the-body", "model": "trivial",
                                   "image": {"data": base64.b64encode(good_png).decode()}}
        body.update(fields)
        return json.dumps({k: v for k, v in body.items() if v is not None}).encode()

    def inline(data: bytes) -> dict[str, str]:
        return {"data": base64.b64encode(data).decode()}

    def one(code: ErrorCode, *more: ErrorCode) -> frozenset[ErrorCode]:
        return frozenset({code, *more})

    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    yield "not json", b"{this is not json", one(ErrorCode.INVALID_JSON)
    yield "binary", bytes(range(256)) * 8, one(ErrorCode.INVALID_JSON)
    yield "a megabyte of garbage", b"x" * 1_000_000, one(ErrorCode.INVALID_JSON)
    yield "deep nesting", b"[" * 100_000 + b"]" * 100_000, one(ErrorCode.INVALID_JOB)
    yield "deep nesting in a field", job(params={"a": json.loads("[" * 400 + "]" * 400)}), one(
        ErrorCode.INVALID_JOB, ErrorCode.INVALID_PARAMS)
    yield "5000-digit job id", b'{"job_id": ' + b"9" * 5000 + b', "model": "trivial"}', one(ErrorCode.INVALID_JOB)
    yield "lone surrogate", b'{"job_id": "a\\udc00", "model": "trivial", "image": {"data": ""}}', one(
        ErrorCode.INVALID_JOB)
    yield "not an object", b"[1, 2, 3]", one(ErrorCode.INVALID_JOB)
    yield "wrong types", job(model=123, job_id=["x"]), one(ErrorCode.INVALID_JOB)
    yield "huge job id", job(job_id="j" * 10_000), one(ErrorCode.INVALID_JOB)
    yield "future schema", job(schema_version=99), one(ErrorCode.UNSUPPORTED_SCHEMA)
    yield "no image", job(image=None), one(ErrorCode.MISSING_IMAGE)
    yield "bad base64", job(image={"data": "%%%"}), one(ErrorCode.BAD_BASE64)
    yield "url-safe base64", job(image={"data": "-_-_"}), one(ErrorCode.BAD_BASE64)
    yield "params out of range", job(params={"conf": 7, "max_det": -1}), one(ErrorCode.INVALID_PARAMS)
    yield "NaN params", job(params={"conf": float("nan")}), one(ErrorCode.INVALID_PARAMS)
    yield "not an image", job(image=inline(b"GIF89a but not really" * 10)), one(ErrorCode.NOT_AN_IMAGE)
    yield "truncated png", job(image=inline(good_png[: len(good_png) // 2])), one(ErrorCode.TRUNCATED_IMAGE)
    yield "empty image", job(image={"data": ""}), one(ErrorCode.EMPTY_IMAGE)
    yield "pixel bomb", job(image=inline(png_claiming(100_000, 100_000))), one(ErrorCode.TOO_MANY_PIXELS)
    yield "unknown model", job(model="other"), one(ErrorCode.UNKNOWN_MODEL)
    yield "unknown version", job(version="9.9.9"), one(ErrorCode.UNKNOWN_VERSION)
    yield "expired", job(deadline=past), one(ErrorCode.EXPIRED)
    yield "ftp url", job(image={"url": "ftp://example.com/a.png"}), one(ErrorCode.INVALID_JOB)
    yield "unparseable url", job(image={"url": "http://[::1"}), one(ErrorCode.INVALID_JOB)
    yield "300-character host", job(image={"url": f"http://{'a' * 300}.example/x.png"}), one(ErrorCode.INVALID_JOB)
    yield "NUL in a file path", job(image={"url": "file:///tmp/a\u0000b.png"}), one(ErrorCode.INVALID_JOB)
    yield "the worker's own metrics", job(image={"url": f"{status_url}/metrics"}), one(ErrorCode.IMAGE_URL_REFUSED)
    yield "cloud metadata", job(image={"url": "http://169.254.169.254/latest/meta-data/"}), one(
        ErrorCode.IMAGE_URL_REFUSED)
    yield "no reply_to", job(), None


def queue_counts(queue: str) -> tuple[int, int]:
    """(ready, unacked) of a queue, as the broker's statistics have it (refreshed every few seconds)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged", "--formatter",
         "json"], check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    found = next(q for q in json.loads(listed) if q["name"] == queue)
    return int(found["messages_ready"]), int(found["messages_unacknowledged"])


async def settled_queue(queue: str, timeout_s: float = 30.0) -> tuple[int, int]:
    """The queue's counts once they read (0, 0), or the last ones read when time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (counts := await asyncio.to_thread(queue_counts, queue)) != (0, 0):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(1)
    return counts


async def test_thousands_of_hostile_messages_leave_the_worker_ready_and_nothing_unacked(
    serve_in_process: ServeInProcess, client: Client, heldout: list[HeldOut], namespace: str, amqp_url: str,
    dead_letters: DeadLetters,
) -> None:
    worker = await serve_in_process("trivial@1.0.0", max_image_pixels=4_000_000)
    good_png = heldout[0].path.read_bytes()
    kinds = list(hostile_bodies(good_png, worker.url))
    topology = Topology(namespace)
    sent = [(f"m{i}", *kinds[i % len(kinds)]) for i in range(MESSAGES)]
    expected = {key: (kind, codes) for key, kind, _, codes in sent if codes is not None}
    dead_expected = sum(codes is None or bool(codes & MALFORMED) for _, _, _, codes in sent)
    results: dict[str, JobResult] = {}
    duplicates = 0
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        done = asyncio.Event()

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal duplicates
            key = message.correlation_id or "?"
            duplicates += key in results
            results[key] = JobResult.model_validate_json(message.body)
            if len(results) == len(expected):
                done.set()

        await replies.consume(on_result, no_ack=True)
        exchange = await channel.get_exchange(topology.jobs_exchange)
        for i, (key, _, body, codes) in enumerate(sent):
            await exchange.publish(aio_pika.Message(
                body, correlation_id=key, reply_to=replies.name if codes is not None else None,
                headers={"x-delivery-count": "not a number"} if i % 7 == 0 else None,
            ), routing_key="trivial")
        await asyncio.wait_for(done.wait(), 180)

        good = await asyncio.wait_for(client.submit(heldout[1].path, model="trivial"), 10)
        assert good.status == "ok" and good.detections
        await dead_letters(channel, namespace, "trivial", dead_expected)  # each right after its result is confirmed
    wrong = Counter(
        (kind, str(error.code if error else "ok"))
        for key, (kind, codes) in expected.items() if (error := results[key].error) is None or error.code not in codes
    )
    assert not wrong, wrong
    assert duplicates == 0
    assert all("Traceback" not in (r.error.message if r.error else "") for r in results.values())
    assert (await worker.get("/readyz"))["ready"]
    assert (await worker.get("/status"))["in_flight"] == 0
    assert await settled_queue(topology.job_queue("trivial")) == (0, 0), "jobs left ready or unacked"
