"""Every AMQP entity the pool uses, declared in one place: names (`schemas.topology`), kinds and
arguments. Workers, the operator, the client and the load tests call it; nothing else declares.

Declarations are idempotent, as AMQP makes them, as long as the arguments agree: a queue that
exists with others (declared by an older release, or by hand) makes the broker close the channel
with PRECONDITION_FAILED, which comes back here as `TopologyMismatch` naming the entity, what
this release declares and what to do about it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed
from pamqp.common import FieldTable

from schemas.topology import Topology

T = TypeVar("T")

#: A stream consumer reads the control log from its first entry.
FROM_THE_START: FieldTable = {"x-stream-offset": "first"}


class TopologyMismatch(RuntimeError):
    """An exchange or queue exists with other properties than this release declares."""


class Declarer:
    def __init__(self, channel: AbstractChannel, topology: Topology) -> None:
        self.channel = channel
        self.topology = topology

    def job_queue_arguments(self, model: str, delivery_limit: int) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.topology.dead_letter_exchange,
            "x-dead-letter-routing-key": model,
        }

    async def jobs_exchange(self) -> AbstractExchange:
        return await self._exchange(self.topology.jobs_exchange, aio_pika.ExchangeType.DIRECT)

    async def job_queue(self, model: str, delivery_limit: int) -> AbstractQueue:
        """The model's quorum queue, bound to the jobs exchange, and its dead-letter queue."""
        jobs = await self.jobs_exchange()
        dlx = await self._exchange(self.topology.dead_letter_exchange, aio_pika.ExchangeType.DIRECT)
        dead = await self._queue(self.topology.dead_letter_queue(model), {"x-queue-type": "quorum"})
        await dead.bind(dlx, routing_key=model)
        queue = await self._queue(self.topology.job_queue(model), self.job_queue_arguments(model, delivery_limit))
        await queue.bind(jobs, routing_key=model)
        return queue

    async def control(self) -> tuple[AbstractExchange, AbstractQueue]:
        """The control exchange and the stream it feeds (the replayable command history)."""
        exchange = await self._exchange(self.topology.control_exchange, aio_pika.ExchangeType.FANOUT)
        log = await self._queue(self.topology.control_log, {"x-queue-type": "stream"})
        await log.bind(exchange, routing_key="")
        return exchange, log

    async def status_exchange(self) -> AbstractExchange:
        return await self._exchange(self.topology.status_exchange, aio_pika.ExchangeType.TOPIC)

    async def reply_queue(self, name: str, expires_s: float) -> AbstractQueue:
        """A producer's durable result queue, removed by the broker once unused for `expires_s`."""
        return await self._queue(name, {"x-expires": int(expires_s * 1000)})

    async def event_queue(self) -> AbstractQueue:
        """A private queue of every status event from now on, gone with its consumer."""
        queue = await self._guarded("a private event queue", self.channel.declare_queue(exclusive=True,
                                                                                        auto_delete=True))
        await queue.bind(await self.status_exchange(), routing_key="#")
        return queue

    async def _exchange(self, name: str, kind: aio_pika.ExchangeType) -> AbstractExchange:
        return await self._guarded(f"exchange {name!r} ({kind.value}, durable)",
                                   self.channel.declare_exchange(name, kind, durable=True))

    async def _queue(self, name: str, arguments: dict[str, Any]) -> AbstractQueue:
        return await self._guarded(f"queue {name!r} (durable, {arguments})",
                                   self.channel.declare_queue(name, durable=True, arguments=arguments))

    async def _guarded(self, what: str, declaring: Awaitable[T]) -> T:
        try:
            return await declaring
        except ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"the broker already has {what.split(' (')[0]} with other properties than this release declares: "
                f"{what}. The broker says: {exc}. Delete it (rabbitmqctl delete_queue / delete_exchange, "
                "after draining it), or use another HOTSWAP_NAMESPACE"
            ) from exc
