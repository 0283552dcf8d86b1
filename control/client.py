"""The producer's client: submit images, await results.

    async with Client("amqp://guest:guest@127.0.0.1/") as client:
        result = await client.submit(Path("bus.jpg"), model="shapes")

The URL may name a cluster's nodes, comma separated: the client connects to the first that answers
and fails over to the next when its node goes away (`worker.connections`). Publishes cut off by
the failover are retried, results held for a reply queue that is replicated when `replicas` (or
`HOTSWAP_QUEUE_REPLICAS`) is set.

Thousands of `submit` calls may run at once on one client. Results arrive on a private reply
queue; delivery is at-least-once, so a second result for a job is counted and dropped. The ids of
answered jobs are remembered for `answered_ttl_s` (10 minutes) and at most `max_answered` (100,000)
of them, oldest forgotten first: a duplicate arriving later than that is counted as late instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TypedDict, Unpack

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError
from yarl import URL

from schemas.jobs import InferenceParams, InlineImage, Job, JobResult, UrlImage
from schemas.topology import JOB_TYPE, Topology
from worker.config import replicas_from_env
from worker.connections import connect, parse_urls
from worker.declarer import Declarer

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: How long a job the broker nacks is published again before the nack is an error: a quorum
#: queue elects a new leader within seconds of losing one.
NACKED_RETRY_S = 30.0

ImageInput = bytes | str | os.PathLike[str] | InlineImage | UrlImage


#: Sees every result message as it arrives, duplicates included: (correlation id, body, redelivered).
ResultObserver = Callable[[str | None, bytes, bool], None]

_RECONNECTING = (
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


class JobOptions(TypedDict, total=False):
    version: str | None  # pin a version (or, with A/B, an alias)
    routing_key: str | None  # jobs with the same key see the same version under A/B
    params: InferenceParams | None
    deadline_s: float | None  # answered `expired` when not started within this many seconds
    job_id: str | None  # default: a fresh uuid


class ClientError(Exception):
    pass


class JobTimeout(ClientError, TimeoutError):
    """No result arrived in time; the job may still run, and a late result is dropped."""


class NoRoute(ClientError):
    """The broker has no queue for this model: no worker has ever served it."""


class Client:
    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str = "hotswap",
        timeout_s: float = 60.0,
        reply_queue_ttl_s: float = 60.0,
        observer: ResultObserver | None = None,
        connection_name: str = "hotswap-client",
        answered_ttl_s: float = 600.0,
        max_answered: int = 100_000,
        replicas: int | None = None,
    ) -> None:
        self.url = url or os.environ.get("HOTSWAP_AMQP_URL", DEFAULT_AMQP_URL)
        self.urls = parse_urls(self.url)
        self.topology = Topology(namespace, replicas=replicas if replicas is not None else replicas_from_env())
        self.timeout_s = timeout_s
        self.reply_queue_ttl_s = reply_queue_ttl_s
        self.observer = observer
        self.connection_name = connection_name
        self.duplicates = 0
        self.late = 0
        #: Publishes retried across a reconnect (each may have made a duplicate job).
        self.republished = 0
        #: Publishes the broker nacked and that were retried (none made a duplicate).
        self.nacked = 0
        self._pending: dict[str, asyncio.Future[JobResult]] = {}
        #: Job ids already answered → when, oldest first (bounded: see the module's docstring).
        self._answered: OrderedDict[str, float] = OrderedDict()
        self.answered_ttl_s = answered_ttl_s
        self.max_answered = max_answered
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._replies: tuple[AbstractQueue, str] | None = None  # the reply queue and our consumer tag
        # The user is in the name so that a broker can let each producer read its own results only
        # (ops/rabbitmq/definitions.json: `^<ns>\.reply\.<user>\..+$`).
        self._reply_queue = f"{namespace}.reply.{URL(self.urls[0]).user or 'guest'}.{uuid.uuid4().hex}"

    @property
    def reply_queue(self) -> str:
        """The queue this client's results arrive on (put it in `reply_to`)."""
        return self._reply_queue

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        # One round over the nodes: a producer that cannot reach any says so at once.
        self._connection = await connect(self.urls, self.connection_name, attempts=1, reconnect_interval_s=0.5)
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._channel.set_qos(prefetch_count=1000)
        # Kept for a while after a disconnect, so a reconnecting client still finds its results;
        # durable (and the results persistent, as the jobs are), so that a broker restart keeps them
        # too; acked by hand, so a result in flight when the connection drops is sent again.
        declarer = Declarer(self._channel, self.topology)
        queue = await declarer.reply_queue(self._reply_queue, self.reply_queue_ttl_s)
        self._replies = (queue, await queue.consume(self._on_result))
        # Declared here too (idempotent) so that publishing before any worker ran is a clean NoRoute.
        self._exchange = await declarer.jobs_exchange()

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._connection is None:
            return
        if self._replies is not None:
            queue, tag = self._replies
            with contextlib.suppress(Exception):  # it expires on its own anyway
                await queue.cancel(tag)  # first, or the broker cancels it (and aio-pika warns)
                await queue.delete(if_unused=False, if_empty=False)
        await self._connection.close()
        self._connection = None

    def build_job(self, image: ImageInput, *, model: str, **options: Unpack[JobOptions]) -> Job:
        now = datetime.now(UTC)
        deadline_s = options.get("deadline_s")
        return Job(
            job_id=options.get("job_id") or uuid.uuid4().hex,
            model=model,
            version=options.get("version"),
            routing_key=options.get("routing_key"),
            image=_image_source(image),
            params=options.get("params") or InferenceParams(),
            deadline=now + timedelta(seconds=deadline_s) if deadline_s is not None else None,
            submitted_at=now,
        )

    async def submit(
        self, image: ImageInput, *, model: str, timeout_s: float | None = None, **options: Unpack[JobOptions]
    ) -> JobResult:
        """Publish one job and wait for its result (an error result is returned, not raised)."""
        return await self.submit_job(self.build_job(image, model=model, **options), timeout_s=timeout_s)

    async def submit_job(self, job: Job, *, timeout_s: float | None = None) -> JobResult:
        body = job.model_dump_json(exclude_none=True).encode()
        return await self.submit_raw(body, model=job.model, job_id=job.job_id, timeout_s=timeout_s)

    async def submit_raw(
        self, body: bytes, *, model: str, job_id: str, timeout_s: float | None = None
    ) -> JobResult:
        """Publish any body under a job id and wait for its result (producers with their own JSON)."""
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = future
        timeout = timeout_s or self.timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self.publish_raw(body, model=model, job_id=job_id)
                return await future
        except TimeoutError as exc:
            raise JobTimeout(f"no result for job {job_id} within {timeout} s") from exc
        finally:
            self._pending.pop(job_id, None)

    async def publish_raw(self, body: bytes, *, model: str, job_id: str) -> None:
        """Publish under a confirm without waiting for the result (the observer sees it).

        Across a reconnect the publish is retried: one cut off before its confirm may have
        reached the broker, so a retry can make a duplicate job, whose second result is dropped.
        """
        if self._exchange is None or self._channel is None:
            raise ClientError("client is not connected; use `async with Client(...)`")
        message = aio_pika.Message(
            body=body,
            content_type="application/json",
            correlation_id=job_id,
            message_id=job_id,
            reply_to=self._reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type=JOB_TYPE,
        )
        nacked_since: float | None = None
        while True:
            try:
                await self._exchange.publish(message, routing_key=model, mandatory=True)
                return
            except aio_pika.exceptions.PublishError as exc:  # returned: before the nack below, its base
                raise NoRoute(f"no queue is bound for model {model!r}: no worker serves it") from exc
            except aio_pika.exceptions.DeliveryError as exc:
                # Nacked: the broker did not take the job, so publishing it again makes no
                # duplicate. A quorum queue whose leader was on a node just lost nacks until its
                # replicas have elected another; a refusal that lasts is an error.
                nacked_since = nacked_since or time.monotonic()
                if time.monotonic() - nacked_since > NACKED_RETRY_S:
                    raise ClientError(f"the broker refused job {job_id} for {NACKED_RETRY_S:g} s: {exc}") from exc
                self.nacked += 1
                await asyncio.sleep(0.2)
            except _RECONNECTING:
                self.republished += 1
                await asyncio.sleep(0.1)
                with contextlib.suppress(*_RECONNECTING):
                    await self._channel.ready()  # type: ignore[attr-defined]

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        if self.observer is not None:
            self.observer(message.correlation_id, message.body, bool(message.redelivered))
        with contextlib.suppress(*_RECONNECTING, RuntimeError):  # unacked, the broker sends it again
            await message.ack()
        try:
            result = JobResult.model_validate_json(message.body)
        except ValidationError:
            return  # not a result of ours; nothing waits for it
        # The correlation id is what we published under; the body's job id may be anything.
        key = message.correlation_id or result.job_id
        future = self._pending.get(key)
        if self._was_answered(key):
            self.duplicates += 1
            return
        self._remember_answered(key)
        if future is None or future.done():
            self.late += 1
        else:
            future.set_result(result)

    def _was_answered(self, key: str) -> bool:
        answered_at = self._answered.get(key)
        return answered_at is not None and time.monotonic() - answered_at <= self.answered_ttl_s

    def _remember_answered(self, key: str) -> None:
        now = time.monotonic()
        self._answered[key] = now
        self._answered.move_to_end(key)
        while self._answered:
            oldest_key, oldest_at = next(iter(self._answered.items()))
            if len(self._answered) <= self.max_answered and now - oldest_at <= self.answered_ttl_s:
                break
            del self._answered[oldest_key]

    @property
    def answered_remembered(self) -> int:
        """Job ids held for duplicate detection now (bounded by `max_answered`)."""
        return len(self._answered)


def _image_source(image: ImageInput) -> InlineImage | UrlImage:
    if isinstance(image, InlineImage | UrlImage):
        return image
    if isinstance(image, bytes):
        return InlineImage(data=image)
    text = os.fspath(image)
    if text.startswith(("http://", "https://", "file://")):
        return UrlImage(url=text)
    return InlineImage(data=Path(text).read_bytes())
