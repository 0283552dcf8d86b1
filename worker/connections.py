"""AMQP transport: the robust connection and the job topology, declared idempotently."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from yarl import URL

from schemas.topology import Topology

log = logging.getLogger(__name__)


async def connect(
    url: str, name: str, *, attempts: int = 0, delay_s: float = 1.0, reconnect_interval_s: float = 1.0,
    heartbeat_s: int | None = None,
) -> AbstractRobustConnection:
    """A robust connection (it reconnects and restores channels, queues and consumers).

    The first connection is retried `attempts` times (0: until cancelled), since a worker often
    starts before its broker does. `heartbeat_s` applies unless the URL sets `?heartbeat=` itself:
    with RabbitMQ's default of 60 s, a stopped (SIGSTOP, swapped out, paused VM) worker keeps its
    unacked jobs for minutes before the broker gives up on it.
    """
    tried = 0
    target = URL(url)
    if heartbeat_s is not None and "heartbeat" not in target.query:
        target = target.update_query(heartbeat=heartbeat_s)
    while True:
        try:
            return await aio_pika.connect_robust(
                target, client_properties={"connection_name": name}, reconnect_interval=reconnect_interval_s
            )
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            tried += 1
            if attempts and tried >= attempts:
                raise
            log.warning("broker at %s not reachable (%s); retrying in %.0f s", _safe(url), exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 15.0)


async def declare_job_topology(
    channel: AbstractChannel, topology: Topology, model: str, delivery_limit: int
) -> AbstractQueue:
    """The jobs exchange, the model's quorum queue and its dead-letter queue."""
    jobs = await channel.declare_exchange(topology.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead = await channel.declare_queue(
        topology.dead_letter_queue(model), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx, routing_key=model)
    queue = await channel.declare_queue(
        topology.job_queue(model),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": topology.dead_letter_exchange,
            "x-dead-letter-routing-key": model,
        },
    )
    await queue.bind(jobs, routing_key=model)
    return queue


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split(':')[0]}:…@{tail}" if sep else url
