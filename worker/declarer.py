"""Every AMQP entity the pool uses, declared in one place: names (`schemas.topology`), kinds and
arguments. Workers, the operator, the client and the load tests call it; nothing else declares.

Declarations are idempotent, as AMQP makes them, as long as the arguments agree: a queue that
exists with others (declared by an older release, or by hand) makes the broker close the channel
with PRECONDITION_FAILED, which comes back here as `TopologyMismatch` naming the entity, what
this release declares and what to do about it.

Under least privilege (ops/rabbitmq/definitions.json) a role may not configure the shared
entities (the exchanges, the control stream): the broker has them from its definitions. Each
entity is therefore first declared on a probe channel of its own; where the broker answers
ACCESS_REFUSED the entity is only checked to exist (a passive declare needs no permission), and
its bindings are left to whoever owns it. With guest, everything is declared as before.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity, ChannelPreconditionFailed
from pamqp.common import FieldTable

from schemas.topology import Topology

T = TypeVar("T")

#: A stream consumer reads the control log from its first entry.
FROM_THE_START: FieldTable = {"x-stream-offset": "first"}


class TopologyMismatch(RuntimeError):
    """An exchange or queue exists with other properties than this release declares."""


class TopologyMissing(RuntimeError):
    """A shared entity this user may not declare does not exist: the broker lacks its definitions."""


#: Declares one entity on a raw channel (the probe), as the real declaration would.
Probe = Callable[[aiormq.abc.AbstractChannel], Awaitable[object]]


class Declarer:
    def __init__(self, channel: AbstractChannel, topology: Topology) -> None:
        self.channel = channel
        self.topology = topology

    def job_queue_arguments(self, model: str, delivery_limit: int) -> dict[str, Any]:
        return {
            **self.quorum_arguments(),
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.topology.dead_letter_exchange,
            "x-dead-letter-routing-key": model,
        }

    def quorum_arguments(self) -> dict[str, Any]:
        """A quorum queue on `topology.replicas` nodes (unset: the broker's `quorum_cluster_size`)."""
        return {"x-queue-type": "quorum", **self._replicas("x-quorum-initial-group-size")}

    def stream_arguments(self) -> dict[str, Any]:
        """The control log on `topology.replicas` nodes (unset: the broker's default, every node)."""
        return {"x-queue-type": "stream", **self._replicas("x-initial-cluster-size")}

    def _replicas(self, argument: str) -> dict[str, Any]:
        # Left out when unset rather than sent as the broker's default: the broker compares the
        # argument on every redeclaration, and entities declared before this setting existed
        # (or on a single node) must keep matching.
        return {} if self.topology.replicas is None else {argument: self.topology.replicas}

    async def jobs_exchange(self) -> AbstractExchange:
        return await self._exchange(self.topology.jobs_exchange, aio_pika.ExchangeType.DIRECT)

    async def job_queue(self, model: str, delivery_limit: int) -> AbstractQueue:
        """The model's quorum queue, bound to the jobs exchange, and its dead-letter queue."""
        jobs = await self.jobs_exchange()
        dlx = await self._exchange(self.topology.dead_letter_exchange, aio_pika.ExchangeType.DIRECT)
        dead, owned = await self._queue(self.topology.dead_letter_queue(model), self.quorum_arguments())
        if owned:
            await dead.bind(dlx, routing_key=model)
        arguments = self.job_queue_arguments(model, delivery_limit)
        queue, owned = await self._queue(self.topology.job_queue(model), arguments)
        if owned:
            await queue.bind(jobs, routing_key=model)
        return queue

    async def control(self) -> tuple[AbstractExchange, AbstractQueue]:
        """The control exchange and the stream it feeds (the replayable command history)."""
        exchange = await self._exchange(self.topology.control_exchange, aio_pika.ExchangeType.FANOUT)
        log, owned = await self._queue(self.topology.control_log, self.stream_arguments())
        if owned:  # otherwise the definitions that made the stream bound it too
            await log.bind(exchange, routing_key="")
        return exchange, log

    async def status_exchange(self) -> AbstractExchange:
        return await self._exchange(self.topology.status_exchange, aio_pika.ExchangeType.TOPIC)

    async def reply_queue(self, name: str, expires_s: float) -> AbstractQueue:
        """A producer's durable result queue, removed by the broker once unused for `expires_s`.

        With replicas (a cluster) it is a quorum queue: a classic queue lives on the one node that
        declared it, and results published to it while that node is down would be lost."""
        replicated = self.quorum_arguments() if self.topology.replicas is not None else {}
        queue, _ = await self._queue(name, {**replicated, "x-expires": int(expires_s * 1000)})
        return queue

    async def fleet_bench_classic_queue(self) -> AbstractQueue:
        """The fleet bench's comparison queue: a durable classic queue, no arguments, on the node
        that declared it, published to straight through the default exchange (no binding)."""
        queue, _ = await self._queue(self.topology.fleet_bench_classic_queue, {})
        return queue

    async def event_queue(self) -> AbstractQueue:
        """A private queue of every status event from now on, gone with its consumer."""
        # Named here rather than by the library (aio-pika makes `amq_<hex>` names itself), so that
        # the broker's permissions can name it: `^<ns>\.events\..+$`.
        name = f"{self.topology.namespace}.events.{uuid.uuid4().hex}"
        queue = await self._guarded("a private event queue", self.channel.declare_queue(name, exclusive=True,
                                                                                        auto_delete=True))
        await queue.bind(await self.status_exchange(), routing_key="#")
        return queue

    async def _exchange(self, name: str, kind: aio_pika.ExchangeType) -> AbstractExchange:
        what = f"exchange {name!r} ({kind.value}, durable)"
        def probe(channel: aiormq.abc.AbstractChannel) -> Awaitable[object]:
            return channel.exchange_declare(name, exchange_type=kind.value, durable=True)

        if await self._may_configure(what, probe):
            return await self._guarded(what, self.channel.declare_exchange(name, kind, durable=True))
        return await self._existing(what, self.channel.declare_exchange(name, passive=True))

    async def _queue(self, name: str, arguments: dict[str, Any]) -> tuple[AbstractQueue, bool]:
        """The queue, and whether this user configures it (declared it, rather than found it)."""
        what = f"queue {name!r} (durable, {arguments})"
        if await self._may_configure(what, lambda ch: ch.queue_declare(name, durable=True, arguments=arguments)):
            declared = await self._guarded(what, self.channel.declare_queue(name, durable=True, arguments=arguments))
            return declared, True
        return await self._existing(what, self.channel.declare_queue(name, passive=True)), False

    async def _may_configure(self, what: str, declare: Probe) -> bool:
        """Declare on a channel of its own first: ACCESS_REFUSED (or any error) closes the channel
        it happens on, and the caller's channel must survive to check the entity instead."""
        connection = (await self.channel.get_underlay_channel()).connection
        probe = await connection.channel()
        try:
            await self._guarded(what, declare(probe))
        except ChannelAccessRefused:
            return False
        finally:
            if not probe.is_closed:
                await probe.close()
        return True

    async def _existing(self, what: str, checking: Awaitable[T]) -> T:
        try:
            return await checking
        except ChannelNotFoundEntity as exc:
            raise TopologyMissing(
                f"{what.split(' (')[0]} does not exist and this user may not declare it (ACCESS_REFUSED): "
                "import ops/rabbitmq/definitions.json into the broker, or connect as a user that may "
                f"configure it. The broker says: {exc}"
            ) from exc

    async def _guarded(self, what: str, declaring: Awaitable[T]) -> T:
        try:
            return await declaring
        except ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"the broker already has {what.split(' (')[0]} with other properties than this release declares: "
                f"{what}. The broker says: {exc}. Delete it (rabbitmqctl delete_queue / delete_exchange, "
                "after draining it), or use another HOTSWAP_NAMESPACE"
            ) from exc
