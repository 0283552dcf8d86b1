"""Acks in runs, against the real broker: what is acked is exactly what was ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from schemas.topology import Topology
from worker.acks import AckRuns
from worker.declarer import Declarer

#: The model whose job queue the tests fill: one of their own, in the test's namespace.
MODEL = "acks"


@dataclass
class Deliveries:
    connection: AbstractConnection
    channel: AbstractChannel
    queue: AbstractQueue
    messages: list[AbstractIncomingMessage]
    acks: AckRuns

    async def left_after_closing(self) -> list[str]:
        """Close the consuming channel (what it left unacked returns to the queue); the bodies left."""
        await self.channel.close()
        queue = await (await self.connection.channel()).get_queue(self.queue.name)
        bodies = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body.decode())
        return sorted(bodies)


@pytest.fixture
async def deliveries(amqp_url: str, namespace: str) -> AsyncIterator[Deliveries]:
    """Eight messages taken unacked from a job queue of their own (a quorum queue, as the declarer
    makes it for a worker: what AckRuns acks in production), each registered with an AckRuns."""
    topology = Topology(namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await Declarer(channel, topology).job_queue(MODEL, delivery_limit=3)
        for i in range(8):
            await channel.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=queue.name)
        acks = AckRuns()
        messages = []
        for _ in range(8):
            message = await queue.get(no_ack=False, timeout=5)
            assert message is not None
            acks.received(message)
            messages.append(message)
        try:
            yield Deliveries(connection, channel, queue, messages, acks)
        finally:
            cleanup = await connection.channel()
            for name in (topology.job_queue(MODEL), topology.dead_letter_queue(MODEL)):
                await cleanup.queue_delete(name)


async def test_jobs_answered_in_one_turn_take_one_ack_frame(deliveries: Deliveries) -> None:
    for message in reversed(deliveries.messages):  # answered out of order, in one turn of the loop
        deliveries.acks.ack(message)
    await deliveries.acks.sent()
    assert deliveries.acks.frames_sent == 1
    assert await deliveries.left_after_closing() == []


async def test_a_job_still_running_is_never_covered_by_a_run(deliveries: Deliveries) -> None:
    for i, message in enumerate(deliveries.messages):
        if i != 3:
            deliveries.acks.ack(message)
    await deliveries.acks.sent()
    # 0-2 as one run; 4-7 singly, so that the running job holds no one else's prefetch slot.
    assert deliveries.acks.frames_sent == 1 + 4
    assert await deliveries.left_after_closing() == ["3"]


async def test_runs_after_single_acks_and_rejects_keep_the_channel_open(deliveries: Deliveries) -> None:
    acks, messages = deliveries.acks, deliveries.messages
    acks.ack(messages[0])
    acks.ack(messages[2])  # above the gap at 1: acked singly, after 0...
    await asyncio.sleep(0)
    for i in (1, 3):  # ...then a run up to 3 covers 2 as well: it must go after, never before
        acks.ack(messages[i])
    await messages[4].reject(requeue=True)  # settled otherwise, as the consumer does: first sent,
    acks.forget(messages[4])  # then no longer a gap
    acks.ack(messages[5])
    await acks.sent()
    assert not deliveries.channel.is_closed, "the broker closed the channel: an ack named an unknown delivery"
    assert await deliveries.left_after_closing() == ["4", "6", "7"]


async def test_held_acks_go_out_only_when_released(deliveries: Deliveries) -> None:
    acks = deliveries.acks
    acks.hold()
    for message in deliveries.messages:
        acks.ack(message)
    await acks.sent()
    await asyncio.sleep(0.05)
    assert acks.frames_sent == 0 and acks.outstanding == 8  # still counted against the prefetch
    acks.release()
    await acks.sent()
    assert acks.frames_sent == 1 and acks.outstanding == 0
    assert await deliveries.left_after_closing() == []
