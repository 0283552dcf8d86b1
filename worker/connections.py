"""AMQP transport: the robust connection, over one broker or a cluster's nodes (what it declares:
`worker.declarer`).

`HOTSWAP_AMQP_URL` may name several nodes of one cluster, comma separated
(`amqp://u:p@node1:5672/,amqp://u:p@node2:5672/`). aio-pika's robust connection reconnects to the
one URL it was given (its issue #141), so `FailoverConnection` keeps the list: whenever its
transport closes, or a connection attempt fails, the next attempt goes to the next node, and the
robust machinery restores channels, queues, bindings and consumers there as it would on the first.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

log = logging.getLogger(__name__)


def parse_urls(text: str) -> list[str]:
    """The broker URLs of a comma-separated `HOTSWAP_AMQP_URL` (one URL is a list of one)."""
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise ValueError("no broker URL given (HOTSWAP_AMQP_URL)")
    return urls


class FailoverConnection(RobustConnection):
    """A robust connection that moves to the next address whenever its transport goes away.

    aio-pika calls `_on_connection_close` both when an established connection drops and when an
    attempt fails (`UnderlayConnection.connect` reports the failure through the same callback),
    and each attempt reads `self.url` afresh: advancing it here is all a failover needs.
    """

    def __init__(self, urls: Sequence[URL], start: int = 0, **kwargs: Any) -> None:
        self.addresses = list(urls)
        self.current = start % len(self.addresses)
        super().__init__(self.addresses[self.current], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called and len(self.addresses) > 1:
            self.current = (self.current + 1) % len(self.addresses)
            self.url = self.addresses[self.current]
            if self.connection_attempt:  # once connected; a first attempt that fails is `connect`'s to tell
                log.warning("broker connection gone or refused; the next attempt goes to %s", self)
        await super()._on_connection_close(closing)


async def connect(
    url: str | Sequence[str], name: str, *, attempts: int = 0, delay_s: float = 1.0,
    reconnect_interval_s: float = 1.0, heartbeat_s: int | None = None,
) -> AbstractRobustConnection:
    """A robust connection (it reconnects and restores channels, queues and consumers), to the
    first reachable of the given URLs (a comma-separated string or a list), in order.

    The first connection is retried `attempts` rounds over every URL (0: until cancelled), since a
    worker often starts before its broker does. `heartbeat_s` applies unless a URL sets
    `?heartbeat=` itself: with RabbitMQ's default of 60 s, a stopped (SIGSTOP, swapped out, paused
    VM) worker keeps its unacked jobs for minutes before the broker gives up on it; it is also how
    soon a connection to a node that vanished without a word (kill -9, a cut cable) is noticed.
    """
    targets = [_with_heartbeat(resolve_url(u), heartbeat_s) for u in _listed(url)]
    rounds = 0
    while True:
        for index, target in enumerate(targets):
            try:
                return await _connect_once(targets, index, name, reconnect_interval_s)
            except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
                log.warning("broker at %s not reachable (%s)", _safe(str(target)), exc)
                if index == len(targets) - 1 and attempts and rounds + 1 >= attempts:
                    raise
        rounds += 1
        log.warning("no broker reachable; retrying in %.0f s", delay_s)
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 15.0)


async def _connect_once(targets: list[URL], index: int, name: str, interval_s: float) -> AbstractRobustConnection:
    connection = FailoverConnection(targets, index, client_properties={"connection_name": name},
                                    reconnect_interval=interval_s)
    try:
        await connection.connect()
    except BaseException:
        await connection.close()  # stops its reconnection task, which would try the next node
        raise
    return connection


def _listed(url: str | Sequence[str]) -> list[str]:
    return parse_urls(url) if isinstance(url, str) else parse_urls(",".join(url))


def _with_heartbeat(target: URL, heartbeat_s: int | None) -> URL:
    if heartbeat_s is not None and "heartbeat" not in target.query:
        return target.update_query(heartbeat=heartbeat_s)
    return target


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
