"""The raw aio-pika loop the worker is measured against (bench 2): consume → reply → ack.

    python -m loadtest.bench_raw --url URL --namespace NS --model trivial [--prefetch 16]

It consumes the model's job queue (declared exactly as the worker declares it: the same quorum
queue), and for each message publishes a minimal valid result to `reply_to` as the worker does
(under publisher confirms, mandatory, as persistent as the job), then acks: the worker's transport
and its invariant, without parsing, decoding or a model. Prints `ready` once consuming; SIGTERM
stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from schemas.topology import Topology
from worker.declarer import Declarer


async def serve(url: str, namespace: str, model: str, prefetch: int, delivery_limit: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(url, client_properties={"connection_name": f"hotswap-bench-raw {namespace}"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await Declarer(channel, Topology(namespace)).job_queue(model, delivery_limit)
        exchange = channel.default_exchange

        async def on_message(message: AbstractIncomingMessage) -> None:
            job_id = message.correlation_id or ""
            body = json.dumps({"job_id": job_id, "status": "ok", "model": model, "worker_id": "raw"}).encode()
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
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.namespace, args.model, args.prefetch, args.delivery_limit))


if __name__ == "__main__":
    main()
