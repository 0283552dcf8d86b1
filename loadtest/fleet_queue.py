"""One queue's ceiling: a closed publish → consume → reply → ack loop, as producers and a worker
run it, with nothing else in the way (no parsing, decoding or model).

The producer publishes each job persistent, `mandatory`, under publisher confirms, to the jobs
exchange (quorum) or straight to the queue (classic); the worker side consumes with a prefetch,
publishes a persistent, confirmed reply to `reply_to` and then acks, as `worker/consumer.py` does
(and `loadtest/bench_raw.py`, bench 2's raw loop). A job counts once its reply is back.

Every queue is declared by the worker's own declarer (`worker/declarer.py`) in a throwaway
namespace: the quorum job queue, and for comparison the classic `<namespace>.classic`
(`Declarer.fleet_bench_classic_queue`). All are deleted after.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from schemas.topology import Topology
from worker.connections import connect
from worker.declarer import Declarer

QueueKind = Literal["classic", "quorum"]
MODEL = "fleetbench"
#: Bytes in flight the loop allows at once: large bodies get fewer lanes, so that the broker's
#: memory alarm (a share of the machine's RAM) is never what is measured.
BYTES_IN_FLIGHT = 32 * 1024 * 1024


@dataclass(frozen=True)
class LoopResult:
    kind: QueueKind
    replicas: int  # 1: one node; N: a quorum queue on N nodes of a cluster
    body_bytes: int
    in_flight: int
    jobs: int
    seconds: float
    p50_ms: float
    #: CPU this process (producer and worker side both) used per second of wall time, in cores:
    #: near 1.0 the Python client, not the broker, may be the ceiling.
    client_cores: float
    #: The broker's (beam.smp) CPU per second, in cores, where it runs here and is known.
    broker_cores: float | None

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Job bodies through the queue (replies are small and not counted)."""
        return self.jobs_per_s * self.body_bytes / 1e6


@dataclass(frozen=True)
class _Counted:
    jobs: int
    client_cores: float
    broker_cores: float | None
    p50_ms: float


def lanes_for(body_bytes: int, most: int = 64) -> int:
    return max(2, min(most, BYTES_IN_FLIGHT // max(body_bytes, 1)))


def process_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of a process on this host (Linux /proc), None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _worker_side(channel: AbstractChannel, queue: AbstractQueue) -> str:
    """Consume → reply (confirmed, mandatory, as persistent as the job) → ack; returns the tag."""
    exchange = channel.default_exchange

    async def on_message(message: AbstractIncomingMessage) -> None:
        if message.reply_to:
            reply = aio_pika.Message(b'{"status":"ok"}', content_type="application/json",
                                     correlation_id=message.correlation_id, delivery_mode=message.delivery_mode)
            await exchange.publish(reply, routing_key=message.reply_to, mandatory=True)
        await message.ack()

    return await queue.consume(on_message)


async def _declare(channel: AbstractChannel, topology: Topology, kind: QueueKind) -> tuple[AbstractExchange, str]:
    """The queue jobs go to; returns the exchange to publish on and the routing key."""
    if kind == "quorum":
        await Declarer(channel, topology).job_queue(MODEL, delivery_limit=3)
        return await Declarer(channel, topology).jobs_exchange(), MODEL
    queue = await Declarer(channel, topology).fleet_bench_classic_queue()
    return channel.default_exchange, queue.name


async def _delete(url: str, topology: Topology, kind: QueueKind) -> None:
    names = ([topology.job_queue(MODEL), topology.dead_letter_queue(MODEL)] if kind == "quorum"
             else [topology.fleet_bench_classic_queue])
    connection = await connect(url, "hotswap-fleetbench cleanup", attempts=1)
    async with connection:
        channel = await connection.channel()
        for name in [*names, f"{topology.namespace}.replies"]:
            await channel.queue_delete(name)
        for exchange in (topology.jobs_exchange, topology.dead_letter_exchange):
            await channel.exchange_delete(exchange)


async def queue_loop(url: str, kind: QueueKind, body_bytes: int, seconds: float, *, replicas: int | None = None,
                     warmup_s: float = 0.5, broker_pid: int | None = None) -> LoopResult:
    """Run the loop for `warmup_s` + `seconds` through a fresh queue; count what `seconds` saw."""
    topology = Topology(f"hotswap-fleetbench-{uuid.uuid4().hex[:8]}", replicas=replicas)
    lanes = lanes_for(body_bytes)
    producer = await connect(url, "hotswap-fleetbench producer", attempts=1)
    worker = await connect(url, "hotswap-fleetbench worker", attempts=1)
    try:
        pub = await producer.channel(publisher_confirms=True, on_return_raises=True)
        exchange, key = await _declare(pub, topology, kind)
        replies = await Declarer(pub, topology).reply_queue(f"{topology.namespace}.replies", expires_s=120)
        work = await worker.channel(publisher_confirms=True, on_return_raises=True)
        await work.set_qos(prefetch_count=32)  # HOTSWAP_PREFETCH's default
        await _worker_side(work, await work.get_queue(topology.job_queue(MODEL) if kind == "quorum" else key))
        counted = await _drive(pub, exchange, key, replies, body_bytes, lanes, warmup_s, seconds, broker_pid)
    finally:
        await worker.close()
        await producer.close()
        await _delete(url, topology, kind)  # consumers gone first: no "cancelled by the broker" noise
    return LoopResult(kind=kind, replicas=replicas or 1, body_bytes=body_bytes, in_flight=lanes, jobs=counted.jobs,
                      seconds=seconds, p50_ms=counted.p50_ms, client_cores=counted.client_cores,
                      broker_cores=counted.broker_cores)


async def _drive(channel: AbstractChannel, exchange: AbstractExchange, key: str, replies: AbstractQueue,
                 body_bytes: int, lanes: int, warmup_s: float, seconds: float,
                 broker_pid: int | None) -> _Counted:
    """`lanes` producers, each with one job out at a time; the measured window follows the warm-up."""
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[None]] = {}

    async def on_reply(message: AbstractIncomingMessage) -> None:
        await message.ack()
        future = waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(None)

    await replies.consume(on_reply)
    body = os.urandom(body_bytes)  # the broker never looks inside: random bytes are as good as a job
    start = loop.time() + warmup_s
    end = start + seconds
    latencies: list[float] = []

    async def lane() -> None:
        while (now := loop.time()) < end:
            job_id = uuid.uuid4().hex
            # Held here: the reply may come (and leave `waiting`) before the publish's confirm does.
            answered = waiting[job_id] = loop.create_future()
            message = aio_pika.Message(body, correlation_id=job_id, reply_to=replies.name,
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=key, mandatory=True)
            await answered
            if start <= (done := loop.time()) <= end:  # completions inside the window count
                latencies.append(done - now)

    lanes_done = asyncio.gather(*(lane() for _ in range(lanes)))
    await asyncio.sleep(max(0.0, start - loop.time()))
    cpu0, broker0, wall0 = time.process_time(), _cpu(broker_pid), time.monotonic()
    await asyncio.sleep(max(0.0, end - loop.time()))
    cpu1, broker1, wall = time.process_time(), _cpu(broker_pid), time.monotonic() - wall0
    await asyncio.wait_for(lanes_done, timeout=60)
    broker = None if broker0 is None or broker1 is None else (broker1 - broker0) / wall
    return _Counted(jobs=len(latencies), client_cores=(cpu1 - cpu0) / wall, broker_cores=broker,
                    p50_ms=1000 * statistics.median(latencies) if latencies else 0.0)


def _cpu(pid: int | None) -> float | None:
    return None if pid is None else process_cpu_s(pid)
