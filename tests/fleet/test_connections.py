"""Several broker addresses: the connection takes the first that answers (the main broker here;
the failover between a cluster's nodes under load is tests/fleet/test_failover.py)."""

from __future__ import annotations

import socket

import aio_pika
import pytest

from control.client import Client
from worker.connections import FailoverConnection, connect, parse_urls


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_comma_separated_setting_is_a_list_of_urls() -> None:
    assert parse_urls(" amqp://a:5701/ ,amqp://b:5702/,") == ["amqp://a:5701/", "amqp://b:5702/"]
    with pytest.raises(ValueError, match="no broker URL"):
        parse_urls(" , ")


async def test_an_address_that_does_not_answer_is_skipped(amqp_url: str) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    connection = await connect(f"{dead},{amqp_url}", "failover-test", attempts=1)
    async with connection:
        assert isinstance(connection, FailoverConnection) and connection.current == 1
        channel = await connection.channel()
        await channel.declare_queue(exclusive=True)  # a working connection, to the second address


async def test_when_no_address_answers_a_round_fails(namespace: str) -> None:
    dead = ",".join(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/" for _ in range(2))
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await connect(dead, "failover-test", attempts=1)
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        async with Client(dead, namespace=namespace):
            pass
