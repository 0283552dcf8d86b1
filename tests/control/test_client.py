"""The client against a real broker and worker: duplicates, late results, timeouts, no route."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aio_pika
import pytest

from control.client import Client, JobTimeout, NoRoute
from schemas.topology import Topology

if TYPE_CHECKING:
    from conftest import HeldOut, ServeInProcess, StartWorker

pytestmark = pytest.mark.slow


async def test_a_second_result_for_a_job_is_counted_and_dropped(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut], namespace: str, amqp_url: str
) -> None:
    start_worker("shapes@1.0.0")
    job = client.build_job(heldout[0].path, model="shapes", job_id="twice")
    body = job.model_dump_json().encode()
    # The same job published twice, as a producer retrying after a lost confirm would.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Topology(namespace).jobs_exchange)
        first = asyncio.create_task(client.submit_job(job))
        await exchange.publish(
            aio_pika.Message(body, correlation_id="twice", reply_to=client.reply_queue), routing_key="shapes"
        )
        result = await first
    deadline = time.monotonic() + 10
    while client.duplicates < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert result.status == "ok" and result.job_id == "twice"
    assert client.duplicates == 1


async def test_timeout_then_the_late_result_is_dropped(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut]
) -> None:
    start_worker("shapes@1.0.0").stop()  # declares the queue, then nobody consumes it
    with pytest.raises(JobTimeout):
        await client.submit(heldout[0].path, model="shapes", timeout_s=1)
    start_worker("shapes@1.0.0")
    deadline = time.monotonic() + 30
    while client.late < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert client.late == 1
    assert (await client.submit(heldout[0].path, model="shapes")).status == "ok"


async def test_no_route_without_any_queue(amqp_url: str, namespace: str, heldout: list[HeldOut]) -> None:
    async with Client(amqp_url, namespace=namespace) as client:
        with pytest.raises(NoRoute):
            await client.submit(heldout[0].path, model="shapes", timeout_s=5)


async def test_answered_job_ids_are_remembered_within_bounds(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, heldout: list[HeldOut]
) -> None:
    """The ids kept for duplicate detection are bounded by count and by age; a copy of a result
    whose id was forgotten counts as late, one still remembered as a duplicate."""
    await serve_in_process()
    async with Client(amqp_url, namespace=namespace, max_answered=3, answered_ttl_s=2.0) as client:
        results = [await client.submit(heldout[0].path, model="trivial", job_id=f"j{i}") for i in range(6)]
        assert client.answered_remembered == 3

        async def replay(result_index: int) -> None:
            result = results[result_index]
            async with await aio_pika.connect(amqp_url) as connection:
                channel = await connection.channel()
                await channel.default_exchange.publish(aio_pika.Message(
                    result.model_dump_json().encode(), correlation_id=result.job_id), routing_key=client.reply_queue)

        async def counted(attribute: str, value: int) -> None:
            async with asyncio.timeout(5):
                while getattr(client, attribute) < value:
                    await asyncio.sleep(0.02)

        await replay(5)  # remembered
        await counted("duplicates", 1)
        await replay(0)  # forgotten: over the count
        await counted("late", 1)
        await asyncio.sleep(2.1)
        await replay(5)  # forgotten: too old
        await counted("late", 2)
        assert client.duplicates == 1
