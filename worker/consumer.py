"""Consumes job queues, publishes each result under publisher confirms, then acks.

The ack comes only after the broker has confirmed the result (invariant 1): a worker killed at
any instant leaves its unacked jobs to be redelivered, and the client drops duplicates. Acks due
in the same turn of the event loop go out as one frame (`worker.acks`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from functools import partial

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from schemas.jobs import JobResult
from schemas.topology import RESULT_TYPE
from worker.acks import AckRuns
from worker.config import WorkerSettings
from worker.declarer import Declarer
from worker.jobs import Delivery, JobProcessor, Outcome
from worker.metrics import WorkerMetrics
from worker.runtime.profiling import STEPS

log = logging.getLogger(__name__)

#: Pauses between tries of a result whose reply queue does not exist (3.85 s in all).
_NO_ROUTE_PAUSES_S = (0.1, 0.25, 0.5, 1.0, 2.0)
#: How long idle must last, once reached, for a drain to be over (several turns of the loop).
_SETTLE_S = 0.05
#: With acks held, how long no delivery must arrive before nothing more is on its way.
_QUIET_S = 0.25


class JobConsumer:
    def __init__(self, settings: WorkerSettings, processor: JobProcessor, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self._channel: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._models = 0  # how many queues `start` consumes
        self._in_flight: set[asyncio.Task[None]] = set()
        self.acks = AckRuns()
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_delivery_at = 0.0

    @property
    def consuming(self) -> bool:
        """Every model's queue is consumed. Not with only some: each queue is declared and bound as
        its turn comes (about 0.5 s apiece on a busy broker), and a job for a model whose queue is
        not bound yet goes back to its producer unrouted (NoRoute), from a worker that said ready."""
        return bool(self._consumers) and len(self._consumers) >= self._models

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self, connection: AbstractRobustConnection, models: list[str]) -> None:
        # A channel of its own: a consumer timeout closes the whole channel it happens on.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._channel = channel
        declarer = Declarer(channel, self.settings.topology)
        self._models = len(models)
        for model in models:
            queue = await declarer.job_queue(model, self.settings.delivery_limit)
            tag = await queue.consume(partial(self._on_message, model))
            self._consumers.append((queue, tag))
            log.info("consuming %s (prefetch %d)", queue.name, self.settings.prefetch)

    async def stop(self, grace_s: float) -> bool:
        """Take no more jobs and answer every one taken; False if `grace_s` ran out first.

        Cancelling a quorum queue's consumer at once would strand the deliveries the queue has
        already handed to the channel process: the channel drops them after its CancelOk, and they
        stay unacked until the connection closes, then come back as redeliveries (seen here, up to
        a prefetch's worth less the jobs in flight; rabbitmq-server #3729). So acks are held
        first: no prefetch slot frees, the broker sends what it has granted and nothing more, and
        once all of it has arrived the cancel strands nothing. The held acks go out before the
        connection closes: those jobs' results are already confirmed (invariant 1 holds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self.acks.hold()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._granted_arrived(), grace_s)
        await self.stop_consuming()
        drained = await self.drain(max(deadline - loop.time(), 0.0))
        self.acks.release()
        await self.acks.sent()
        return drained

    async def _granted_arrived(self) -> None:
        # Exact when every consumer's prefetch is spent (its queue had jobs to give); otherwise a
        # queue ran dry, and a quiet spell says nothing more is on the way.
        loop = asyncio.get_running_loop()
        while self.acks.outstanding < self.settings.prefetch * len(self._consumers):
            if loop.time() - self._last_delivery_at >= _QUIET_S:
                return
            await asyncio.sleep(0.01)

    async def stop_consuming(self) -> None:
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            try:
                await queue.cancel(tag)
            except Exception as exc:  # the connection may already be gone; nothing to cancel then
                log.warning("cancelling consumer on %s failed: %s", queue.name, exc)

    async def drain(self, timeout_s: float) -> bool:
        """Wait for in-flight jobs to be answered and acked; False if time ran out."""
        try:
            await asyncio.wait_for(self._drained(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _drained(self) -> None:
        # A delivery read just before the cancel's CancelOk reaches `_on_message` two task hops
        # later (aiormq's task, then aio-pika's): idle now may only mean those have not started
        # yet, and exiting then would hand them back to the broker as redeliveries. Idle must
        # still hold once every ready task has run.
        while True:
            await self._idle.wait()
            await self.acks.sent()
            await asyncio.sleep(_SETTLE_S)
            if self._idle.is_set():
                return

    async def _on_message(self, model: str, message: AbstractIncomingMessage) -> None:
        """Answer one delivery, with the promise that it settles (invariant 9): if a bug lets
        anything escape, or leaves the delivery neither acked nor rejected, the job goes back to
        its queue, whose delivery limit ends the retries. Unsettled, it would hold a prefetch slot
        until the channel closes and break every ack run above it. (Plain try/finally, not a
        context manager: this runs for every job.)"""
        task = asyncio.current_task()
        assert task is not None
        with STEPS.step("bookkeeping"):
            self._in_flight.add(task)
            self._idle.clear()
            self._last_delivery_at = asyncio.get_running_loop().time()
            self.metrics.in_flight_of(model).inc()
            self.acks.received(message)
        try:
            outcome = await self.processor.process(_delivery(message, model))
            await self._settle(message, outcome, model)
        except Exception:
            log.exception("handling delivery %s from %s failed", message.delivery_tag, model)
        finally:
            if self.acks.unsettled(message):
                log.error("delivery %s from %s was left unsettled; requeueing it", message.delivery_tag, model)
                await self._give_back(message)
            with STEPS.step("bookkeeping"):
                self.metrics.in_flight_of(model).dec()
                self._in_flight.discard(task)
                if not self._in_flight:
                    self._idle.set()

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome, model: str) -> None:
        try:
            if outcome.reply_to:
                await self._publish_result(outcome.result, outcome.reply_to, message)
        except Exception as exc:  # unconfirmed: the job goes back to the queue for another try
            self.metrics.results_unpublished.labels(model).inc()
            log.warning("result of job %s not confirmed (%s); requeueing the job", outcome.result.job_id, exc)
            await self._give_back(message)
            return
        if not outcome.dead_letter:
            with STEPS.step("ack"):
                self.acks.ack(message)  # with the other jobs answered in this turn of the event loop
            return
        try:
            await message.reject(requeue=False)
        except Exception as exc:  # the channel went away; the broker redelivers it, and we answer again
            log.warning("dead-lettering job %s failed (%s)", outcome.result.job_id, exc)
            return
        finally:
            self.acks.forget(message)  # only once sent: until then it keeps any run from covering it
        code = outcome.result.error.code if outcome.result.error else "unknown"
        self.metrics.dead_lettered.labels(model, code).inc()

    async def _publish_result(self, result: JobResult, reply_to: str, job: AbstractIncomingMessage) -> None:
        """Publish under a confirm, as durable as the job was (a persistent job gets a persistent
        result: in a durable reply queue it outlives a broker restart), and only into a queue
        (mandatory): a result the broker routes nowhere would be confirmed all the same, and lost.
        A reply queue missing now may be its client's, declaring it again after a reconnect (or, in a
        cluster, electing a leader, nacking meanwhile): a few more tries over some seconds, then the
        job goes back to the queue, until its delivery limit."""
        if self._channel is None:
            raise RuntimeError("the job channel is not open")
        with STEPS.step("serialize"):
            reply = aio_pika.Message(
                body=result.model_dump_json(exclude_none=True).encode(), content_type="application/json",
                correlation_id=job.correlation_id or result.job_id, type=RESULT_TYPE,
                delivery_mode=job.delivery_mode,
            )
        for pause_s in (*_NO_ROUTE_PAUSES_S, None):
            try:
                await self._channel.default_exchange.publish(reply, routing_key=reply_to, mandatory=True)
                return
            except aio_pika.exceptions.DeliveryError:
                # Returned (PublishError: no queue by that name, yet), or nacked: a replicated
                # reply queue whose leader was on a node just lost refuses until it has another.
                if pause_s is None:
                    raise
                await asyncio.sleep(pause_s)

    async def _give_back(self, message: AbstractIncomingMessage) -> None:
        # Left unacked on a channel that stays open, a job would never be redelivered.
        try:
            await message.nack(requeue=True)
        except Exception as exc:  # the channel is gone: the broker redelivers it anyway
            log.warning("requeueing delivery %s failed (%s)", message.delivery_tag, exc)
        finally:
            self.acks.forget(message)


def _delivery(message: AbstractIncomingMessage, model: str) -> Delivery:
    # Quorum queues count earlier deliveries in x-delivery-count; absent on the first one.
    count = (message.headers or {}).get("x-delivery-count", 0)
    return Delivery(
        body=message.body,
        queue_model=model,
        reply_to=message.reply_to,
        correlation_id=message.correlation_id,
        attempt=int(count) + 1 if isinstance(count, int) else 1,
    )

