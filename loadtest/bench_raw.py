"""The raw aio-pika loops the worker is measured against (bench 2): consume → reply → ack.

    python -m loadtest.bench_raw --url URL --namespace NS --model trivial [--prefetch 16] [--decode]

It consumes the model's job queue (declared exactly as the worker declares it: the same quorum
queue), and for each message publishes a result to `reply_to` as the worker does (under publisher
confirms, mandatory, as persistent as the job), then acks: the worker's transport and its
invariant, without a pool, a router, a batcher or a model. Two ways:

- transport only (the default): a fixed minimal result, nothing read from the body;
- `--decode`: what any consumer of the job contract has to do before a model could run, done the
  plain way on the event loop: the JSON read (`json.loads`), its base64 image decoded, the pixels
  decoded by OpenCV; the reply is a result of the worker's own shape (timings, the image's size,
  no detections). What the worker spends beyond this loop is the pool's own cost.

Prints `ready` once consuming; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import cv2
import numpy as np
from aio_pika.abc import AbstractIncomingMessage

from schemas.topology import Topology
from worker.declarer import Declarer


def transport_only(body: bytes, job_id: str, model: str) -> bytes:
    return json.dumps({"job_id": job_id, "status": "ok", "model": model, "worker_id": "raw"}).encode()


def decoded(body: bytes, job_id: str, model: str) -> bytes:
    """The job read and its image decoded, answered as the worker answers (its result's fields)."""
    received, started = datetime.now(UTC), time.perf_counter()
    job: dict[str, Any] = json.loads(body)
    data = base64.b64decode(job["image"]["data"], validate=True)
    decode_started = time.perf_counter()
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    decode_ms = (time.perf_counter() - decode_started) * 1000
    if pixels is None:
        raise ValueError("OpenCV could not decode the image")
    height, width = pixels.shape[:2]
    submitted = job.get("submitted_at")
    wait_ms = (received - datetime.fromisoformat(submitted)).total_seconds() * 1000 if submitted else None
    return json.dumps({
        "schema_version": 1, "job_id": job["job_id"], "status": "ok", "model": model, "version": "1.0.0",
        "worker_id": "raw", "attempt": 1,
        "timings": {**({"queue_wait_ms": max(0.0, wait_ms)} if wait_ms is not None else {}), "decode_ms": decode_ms,
                    "inference_ms": 0.0, "total_ms": (time.perf_counter() - started) * 1000},
        "image": {"width": width, "height": height}, "detections": [], "output": {"task": "detect"},
    }, separators=(",", ":")).encode()


async def serve(url: str, namespace: str, model: str, prefetch: int, delivery_limit: int, *, decode: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    answer = decoded if decode else transport_only
    connection = await aio_pika.connect(url, client_properties={"connection_name": f"hotswap-bench-raw {namespace}"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await Declarer(channel, Topology(namespace)).job_queue(model, delivery_limit)
        exchange = channel.default_exchange

        async def on_message(message: AbstractIncomingMessage) -> None:
            job_id = message.correlation_id or ""
            body = answer(message.body, job_id, model)
            if message.reply_to:
                reply = aio_pika.Message(body, content_type="application/json", correlation_id=job_id,
                                         type="hotswap.result", delivery_mode=message.delivery_mode)
                await exchange.publish(reply, routing_key=message.reply_to, mandatory=True)
            await message.ack()

        tag = await queue.consume(on_message)
        print("ready", flush=True)
        await stop.wait()
        await queue.cancel(tag)
        await asyncio.sleep(0.2)  # replies in flight get their confirms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument("--delivery-limit", type=int, default=3)
    parser.add_argument("--decode", action="store_true",
                        help="read each job and decode its image, and answer with the worker's result fields")
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.namespace, args.model, args.prefetch, args.delivery_limit, decode=args.decode))


if __name__ == "__main__":
    main()
