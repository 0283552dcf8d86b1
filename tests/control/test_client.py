"""The client against a real broker and worker: duplicates, late results, timeouts, no route."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest

from control.client import Client, JobTimeout, NoRoute
from schemas.topology import Topology

pytestmark = pytest.mark.slow


async def test_a_second_result_for_a_job_is_counted_and_dropped(
    start_worker, client: Client, heldout, namespace: str, amqp_url: str
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


async def test_timeout_then_the_late_result_is_dropped(start_worker, client: Client, heldout) -> None:
    start_worker("shapes@1.0.0").stop()  # declares the queue, then nobody consumes it
    with pytest.raises(JobTimeout):
        await client.submit(heldout[0].path, model="shapes", timeout_s=1)
    start_worker("shapes@1.0.0")
    deadline = time.monotonic() + 30
    while client.late < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert client.late == 1
    assert (await client.submit(heldout[0].path, model="shapes")).status == "ok"


async def test_no_route_without_any_queue(amqp_url: str, namespace: str, heldout) -> None:
    async with Client(amqp_url, namespace=namespace) as client:
        with pytest.raises(NoRoute):
            await client.submit(heldout[0].path, model="shapes", timeout_s=5)
