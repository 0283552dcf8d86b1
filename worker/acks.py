"""Acks in runs: one `basic.ack(multiple=True)` settles every job up to it that is ready.

A micro-batch answers its jobs together, so their acks fall due in the same turn of the event
loop. Sending one frame for the lot instead of one each saves the worker a write and the broker a
settle command per job. Invariant 1 still holds: a delivery is acked, singly or as part of a run,
only once its result is confirmed. A job still running below a ready one breaks the run (the
ones above it are acked singly, so a slow job never holds the others' prefetch slots).

Delivery tags count per channel, so the state is kept per channel; a channel that has closed takes
its unacked deliveries with it (the broker redelivers them) and its state is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import AbstractChannel

log = logging.getLogger(__name__)


class AckRuns:
    def __init__(self) -> None:
        # Per channel: delivery tag → the message once it may be acked, None while its job runs.
        self._unacked: dict[AbstractChannel, dict[int, AbstractIncomingMessage | None]] = {}
        self._flush: asyncio.Handle | None = None
        # One sender, frames in order: a single ack sent after a multiple one covering it would be
        # an unknown delivery tag to the broker, which closes the channel for it.
        self._frames: deque[tuple[AbstractIncomingMessage, bool]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._held = False
        self.frames_sent = 0  # basic.ack frames, for tests and the curious

    def received(self, message: AbstractIncomingMessage) -> None:
        """Call for every delivery, before its job starts."""
        channel, tag = _channel_of(message), message.delivery_tag
        if channel is not None and tag is not None:
            self._unacked.setdefault(channel, {})[tag] = None

    def ack(self, message: AbstractIncomingMessage) -> None:
        """The job's result is confirmed: ack it with the next run (this turn of the loop)."""
        tags, tag = self._tags_of(message), message.delivery_tag
        if tags is not None and tag in tags:
            tags[tag] = message
            self._schedule_flush()

    @property
    def outstanding(self) -> int:
        """Deliveries received on open channels and not yet settled (held acks included): what
        the broker counts against the consumers' prefetch, less what it has on the way."""
        return sum(len(tags) for channel, tags in self._unacked.items() if not channel.is_closed)

    def hold(self) -> None:
        """Send no acks until `release`: no prefetch slot frees, so the broker sends nothing more."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._schedule_flush()

    @property
    def unsettled_count(self) -> int:
        """Deliveries received on open channels and neither acked nor otherwise settled yet."""
        return sum(m is None for channel, tags in self._unacked.items() if not channel.is_closed for m in tags.values())

    def unsettled(self, message: AbstractIncomingMessage) -> bool:
        """Received on a channel still open, and neither acked nor forgotten since."""
        tags = self._tags_of(message)
        return tags is not None and message.delivery_tag in tags and tags[message.delivery_tag] is None

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The delivery was settled otherwise (rejected, nacked): no run may include it."""
        tags, tag = self._tags_of(message), message.delivery_tag
        if tags is not None and tag is not None:
            tags.pop(tag, None)
            self._schedule_flush()  # it may have been the gap in front of a run

    async def sent(self) -> None:
        """Wait until every ack that has fallen due is written (before closing the connection)."""
        while self._flush is not None or self._sender is not None:
            await asyncio.gather(*([self._sender] if self._sender else []), asyncio.sleep(0), return_exceptions=True)

    def _tags_of(self, message: AbstractIncomingMessage) -> dict[int, AbstractIncomingMessage | None] | None:
        channel = _channel_of(message)
        return None if channel is None else self._unacked.get(channel)

    def _schedule_flush(self) -> None:
        if self._flush is None and not self._held:
            self._flush = asyncio.get_running_loop().call_soon(self._send_runs)

    def _send_runs(self) -> None:
        self._flush = None
        for channel, tags in list(self._unacked.items()):
            if channel.is_closed:
                del self._unacked[channel]
            else:
                self._frames.extend(_runs(tags))
        if self._frames and self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._frames:
                message, multiple = self._frames.popleft()
                try:
                    await message.ack(multiple=multiple)
                    self.frames_sent += 1
                except Exception as exc:  # the channel went away: the broker redelivers what it held
                    log.warning("ack of delivery %s failed (%s); the broker will redeliver",
                                message.delivery_tag, exc)
        finally:
            self._sender = None


def _channel_of(message: AbstractIncomingMessage) -> AbstractChannel | None:
    try:
        return message.channel
    except ChannelInvalidStateError:  # closed: nothing it delivered can be acked any more
        return None


def _runs(tags: dict[int, AbstractIncomingMessage | None]) -> list[tuple[AbstractIncomingMessage, bool]]:
    """Take the ready deliveries out of `tags` as ack frames: (message, multiple)."""
    frames: list[tuple[AbstractIncomingMessage, bool]] = []
    run: list[AbstractIncomingMessage] = []  # ready, with nothing unsettled below them
    gap = False
    for tag in sorted(tags):  # a multiple ack covers every lower tag: the order must be certain
        message = tags[tag]
        if message is None:
            gap = True
            continue
        del tags[tag]
        if gap:
            frames.append((message, False))
        else:
            run.append(message)
    if run:
        frames.insert(0, (run[-1], len(run) > 1))
    return frames
