"""One declarer for every AMQP entity: idempotent, and clear when the broker holds something else."""

import aio_pika
import pytest

from schemas.topology import Topology
from worker.declarer import Declarer, TopologyMismatch


async def test_everything_declares_twice_and_a_changed_argument_is_named(amqp_url: str, namespace: str) -> None:
    topology = Topology(namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for _ in range(2):  # a second worker, or a restart, declares the same again
            declarer = Declarer(await connection.channel(), topology)
            queue = await declarer.job_queue("shapes", delivery_limit=5)
            _, log = await declarer.control()
            await declarer.status_exchange()
            await declarer.reply_queue(f"{namespace}.replies.test", expires_s=60)
            await declarer.event_queue()
            classic = await declarer.fleet_bench_classic_queue()
            assert (queue.name, log.name) == (topology.job_queue("shapes"), topology.control_log)
            assert classic.name == topology.fleet_bench_classic_queue == f"{namespace}.classic"
        changed = Declarer(await connection.channel(), topology)
        with pytest.raises(TopologyMismatch) as caught:
            await changed.job_queue("shapes", delivery_limit=6)  # another release's limit
        message = str(caught.value)
        assert f"queue '{topology.job_queue('shapes')}'" in message and "'x-delivery-limit': 6" in message
        assert "PRECONDITION_FAILED" in message and "delete" in message.lower()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):  # classic: the point of comparing
            await (await connection.channel()).declare_queue(topology.fleet_bench_classic_queue, durable=True,
                                                             arguments={"x-queue-type": "quorum"})
        channel = await connection.channel()
        await channel.queue_delete(f"{namespace}.replies.test")
        await channel.queue_delete(topology.fleet_bench_classic_queue)
