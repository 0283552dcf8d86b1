"""The operator's reading of the control log, against the broker: every command once per operator,
numbered after the newest whoever published it, forged entries left out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aio_pika
import aio_pika.abc

from control.operator import Operator
from loadtest.scenarios import rabbitmqctl
from schemas.control import Heartbeat, Rollback, Update
from schemas.signing import KeyFiles, Signer
from schemas.topology import Topology


def _other(amqp_url: str, namespace: str, control_keys: KeyFiles) -> Operator:
    return Operator(amqp_url, namespace=namespace, signer=Signer.from_file(control_keys.control_key), issuer="other")


async def test_the_log_is_read_on_from_where_the_last_read_ended(
    operator: Operator, amqp_url: str, namespace: str, control_keys: KeyFiles
) -> None:
    """Each publish numbers its command after the log's newest; an operator reads each entry once
    (a publish read the whole history again before, so its cost grew with every command)."""
    await operator.publish("shapes", Update(version="2.0.0"))
    async with _other(amqp_url, namespace, control_keys) as other:
        await other.publish("shapes", Rollback())  # reads the first command, from the start
        await other.publish_envelope(b'{"forged": true}', "forged")
    await operator.publish("shapes", Update(version="2.0.0"))  # reads on: the rollback, the forgery
    history = await operator.read_log()
    assert [(c.seq, c.action.kind, c.issuer) for c in history] == [
        (1, "update", "tests"), (2, "rollback", "other"), (3, "update", "tests")]
    assert operator._entries_read == 4, "the log was read again from its start"
    async with _other(amqp_url, namespace, control_keys) as fresh:
        assert await fresh.read_log() == history


async def test_reads_at_once_add_each_command_once(operator: Operator) -> None:
    """The console reads the log for requests that arrive together."""
    for version in ("2.0.0", "1.0.0"):
        await operator.publish("shapes", Update(version=version))
    first, second = await asyncio.gather(operator.read_log(), operator.read_log())
    assert [c.seq for c in first] == [c.seq for c in second] == [1, 2]


async def test_a_log_deleted_and_made_anew_is_read_from_its_start(
    operator: Operator, amqp_url: str, namespace: str
) -> None:
    """An operator that outlives its namespace's log (deleted by hand) does not keep the old history."""
    for version in ("2.0.0", "1.0.0", "2.0.0"):
        await operator.publish("shapes", Update(version=version))
    assert len(await operator.read_log()) == 3
    async with await aio_pika.connect(amqp_url) as connection:
        await (await connection.channel()).queue_delete(Topology(namespace).control_log)
    assert await operator.read_log() == []  # declared anew by the read, and empty
    await operator.publish("shapes", Rollback())
    assert [c.seq for c in await operator.read_log()] == [1]


async def test_followers_share_one_subscription_and_each_gets_every_event(
    operator: Operator, amqp_url: str, namespace: str, control_keys: KeyFiles
) -> None:
    """A subscription at the broker per command cost it a queue, a binding, a consumer and a
    channel each time; the operator keeps one for every follower, for as long as it is open."""
    signer = Signer.from_file(control_keys.worker_key)
    topology = Topology(namespace)

    async def heartbeat(status: aio_pika.abc.AbstractExchange, worker: str) -> None:
        beat = Heartbeat(worker_id=worker, at=datetime.now(UTC), models={})
        await status.publish(aio_pika.Message(signer.sign_event(beat)), routing_key=f"heartbeat.{worker}")

    async with await aio_pika.connect(amqp_url) as connection:
        status = await (await connection.channel()).get_exchange(topology.status_exchange)
        async with operator.events() as first:
            async with operator.events() as second:
                await heartbeat(status, "a")
                got = [await asyncio.wait_for(q.get(), 10) for q in (first, second)]
                assert [b.worker_id for b in got] == ["a", "a"]
            await heartbeat(status, "b")
            assert (await asyncio.wait_for(first.get(), 10)).worker_id == "b"
            assert second.empty()  # it stopped following
        queues = await _event_queues(topology)
        async with operator.events() as third:  # after every follower has left: the same queue
            await heartbeat(status, "c")
            assert (await asyncio.wait_for(third.get(), 10)).worker_id == "c"
        assert await _event_queues(topology) == queues and len(queues) == 1


async def _event_queues(topology: Topology) -> list[str]:
    """The namespace's event queues at the broker (AMQP cannot list queues)."""
    prefix = f"{topology.namespace}.events."
    listed = (await rabbitmqctl("list_queues", "name")).splitlines()
    return sorted(line.strip() for line in listed if line.strip().startswith(prefix))
