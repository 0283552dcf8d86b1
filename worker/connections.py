"""AMQP transport: the robust connection (what it declares: `worker.declarer`)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

log = logging.getLogger(__name__)


async def connect(
    url: str, name: str, *, attempts: int = 0, delay_s: float = 1.0, reconnect_interval_s: float = 1.0,
    heartbeat_s: int | None = None,
) -> AbstractRobustConnection:
    """A robust connection (it reconnects and restores channels, queues and consumers).

    The first connection is retried `attempts` times (0: until cancelled), since a worker often
    starts before its broker does. `heartbeat_s` applies unless the URL sets `?heartbeat=` itself:
    with RabbitMQ's default of 60 s, a stopped (SIGSTOP, swapped out, paused VM) worker keeps its
    unacked jobs for minutes before the broker gives up on it.
    """
    tried = 0
    target = resolve_url(url)
    if heartbeat_s is not None and "heartbeat" not in target.query:
        target = target.update_query(heartbeat=heartbeat_s)
    while True:
        try:
            return await aio_pika.connect_robust(
                target, client_properties={"connection_name": name}, reconnect_interval=reconnect_interval_s
            )
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            tried += 1
            if attempts and tried >= attempts:
                raise
            log.warning("broker at %s not reachable (%s); retrying in %.0f s", _safe(url), exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 15.0)


def resolve_url(url: str, password_file: Path | None = None) -> URL:
    """The broker URL, its password read from `password_file` (default: `HOTSWAP_AMQP_PASSWORD_FILE`)
    where one is given: a mounted secret stays out of the environment, `ps` and logs, and needs no
    URL-encoding. TLS settings (`amqps://`, `?cafile=&certfile=&keyfile=`) stay in the URL."""
    target = URL(url)
    named = password_file or os.environ.get("HOTSWAP_AMQP_PASSWORD_FILE")
    if not named:
        return target
    password = Path(named).read_text().rstrip("\r\n")  # as written by echo, or a k8s secret
    return target.with_password(password)


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split(':')[0]}:…@{tail}" if sep else url
