"""The operator's side of the control plane: sign and publish commands, follow what workers do.

    async with Operator(url, signer=Signer.from_file(Path("keys/control.key")),
                        workers=Verifier.from_file(Path("keys/worker.pub"))) as op:
        report = await op.publish_and_wait("shapes", Update(version="2.0.0"), timeout_s=120)

`url` may name a cluster's nodes, comma separated (`worker.connections` fails over between them).

Only status events signed with the worker key, and recent, are believed: anyone who can publish
to the status exchange could otherwise make `--wait` report a success no worker reported. The
rest are dropped and counted in `rejected_events`, by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from pamqp.common import FieldTable

from schemas.control import Action, Command, Heartbeat, Progress
from schemas.rollout import RolloutMark
from schemas.signing import Refused, Signer, Verifier
from schemas.topology import SYNC_TYPE, Topology
from worker.config import replicas_from_env
from worker.connections import connect
from worker.declarer import FROM_THE_START, Declarer, TopologyMismatch, TopologyMissing

FINAL_PHASES = frozenset({"done", "failed", "refused"})
#: A status event older (or further ahead, for clocks apart) than this is a replay, or useless.
MAX_EVENT_AGE_S = 60.0
#: Between tries of reading the control log while the cluster recovers.
_RETRY_PAUSE_S = 1.0
#: How long reading on from an offset waits for its marker before it reads the log from the start.
_READ_ON_WAIT_S = 5.0

log = logging.getLogger(__name__)


class NoWorkerKey(ValueError):
    """Following workers needs the key that verifies their status events."""


@dataclass
class WaitReport:
    command: Command
    published_at: float
    #: Every progress event per worker, in arrival order.
    progress: dict[str, list[Progress]] = field(default_factory=dict)
    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)
    #: Status events dropped while waiting because they failed authentication, by reason.
    rejected_events: Counter[str] = field(default_factory=Counter)

    def final(self, worker: str) -> Progress | None:
        return next((p for p in reversed(self.progress.get(worker, [])) if p.phase in FINAL_PHASES), None)

    @property
    def workers(self) -> list[str]:
        return sorted({*self.progress, *self.heartbeats})

    @property
    def missing(self) -> list[str]:
        return [w for w in self.workers if self.final(w) is None]

    @property
    def failures(self) -> dict[str, str]:
        return {w: f"{p.phase}: {p.reason}" for w in self.workers if (p := self.final(w)) and p.phase != "done"}

    @property
    def ok(self) -> bool:
        return bool(self.workers) and not self.missing and not self.failures


class Operator:
    def __init__(
        self, url: str, *, namespace: str = "hotswap", signer: Signer | None = None, issuer: str = "operator",
        workers: Verifier | None = None, max_event_age_s: float = MAX_EVENT_AGE_S, replicas: int | None = None,
        settle_s: float = 2.5,
    ) -> None:
        self.url = url
        # The control log is declared here too: with the workers' replica setting, or the broker
        # refuses the declaration (HOTSWAP_QUEUE_REPLICAS, as the workers read it).
        self.topology = Topology(namespace, replicas=replicas if replicas is not None else replicas_from_env())
        self.signer = signer
        self.issuer = issuer
        #: Verifies the workers' status events (their worker.pub); without it, none can be followed.
        self.workers = workers
        self.max_event_age_s = max_event_age_s
        #: How long `publish_and_wait` listens at least: a little over the workers' heartbeat interval.
        self.settle_s = settle_s
        self.rejected_events: Counter[str] = Counter()
        #: The control log as read so far, and the stream offset the next read starts from: a
        #: command is read (and its signature checked) once per operator, not once per publish.
        self._history: list[Command] = []
        self._read_from: int | None = None
        self._entries_read = 0  # log entries the broker delivered to this operator (tests watch it)
        self._reading = asyncio.Lock()  # two reads at once (the console's requests) would add twice
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._control: AbstractExchange | None = None
        #: Every `events()` open now, each with its own queue; one broker subscription feeds them.
        self._followers: set[asyncio.Queue[Progress | Heartbeat]] = set()
        self._subscribed = False
        self._subscribing = asyncio.Lock()

    async def __aenter__(self) -> Operator:
        self._connection = await connect(self.url, "hotswap-operator", attempts=1)
        self._channel = await self._connection.channel(publisher_confirms=True)
        declarer = Declarer(self._channel, self.topology)
        self._control, _ = await declarer.control()
        await declarer.status_exchange()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def read_log(self, timeout_s: float = 30.0) -> list[Command]:
        """Every validly signed command in the control log so far.

        A cluster that has just lost a node may fail a reader of the stream for a moment (3.10 here
        closed the whole connection with INTERNAL_ERROR right after the node was killed): the read
        is tried again, on the connection reconnected to another node, until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        async with self._reading:
            return await self._read_log_retrying(deadline)

    async def _read_log_retrying(self, deadline: float) -> list[Command]:
        while True:
            try:
                return await self._read_log_once(max(deadline - time.monotonic(), _RETRY_PAUSE_S))
            except (TopologyMismatch, TopologyMissing):
                raise
            except (ConnectionError, RuntimeError) as exc:  # AMQP errors are ConnectionErrors; closed ones Runtime
                if time.monotonic() + _RETRY_PAUSE_S >= deadline:
                    raise
                log.warning("reading the control log failed (%s: %s); trying again", type(exc).__name__, exc)
                await asyncio.sleep(_RETRY_PAUSE_S)

    async def _read_log_once(self, timeout_s: float) -> list[Command]:
        """Reads on from where the last read ended, up to a marker published now: what was in the
        log when the read began, and nothing twice."""
        assert self._connection is not None and self._control is not None and self.signer is not None
        verifier = self.signer.verifier()
        marker = uuid.uuid4().hex
        entries: dict[int, Command | None] = {}  # by stream offset: deliveries may be handled out of order
        end: list[int] = []
        done = asyncio.Event()
        channel = await self._connection.channel()

        async def on_message(message: AbstractIncomingMessage) -> None:
            offset = (message.headers or {}).get("x-stream-offset")
            await message.ack()
            if not isinstance(offset, int):  # a stream always says; anything else is not the log
                return
            if message.type == SYNC_TYPE:
                if message.message_id == marker:
                    end.append(offset)
                    done.set()
                return
            try:
                entries[offset] = verifier.open(message.body)
            except Refused:  # forged or broken entries are not part of the history
                entries[offset] = None

        start: FieldTable = FROM_THE_START if self._read_from is None else {"x-stream-offset": self._read_from}
        reading_on = self._read_from is not None and timeout_s > _READ_ON_WAIT_S
        try:
            await channel.set_qos(prefetch_count=256)
            _, queue = await Declarer(channel, self.topology).control()
            await queue.consume(on_message, arguments=start)
            await self._control.publish(aio_pika.Message(b"", type=SYNC_TYPE, message_id=marker), routing_key="")
            try:
                await asyncio.wait_for(done.wait(), _READ_ON_WAIT_S if reading_on else timeout_s)
            except TimeoutError:
                if not reading_on:
                    raise
        finally:
            with contextlib.suppress(Exception):  # already closed with its connection
                await channel.close()
        if not done.is_set():
            # Reading on waits for entries past the last offset seen; a log deleted and made anew
            # since has none there yet, and the marker went to its start.
            log.warning("the control log did not reach its end from offset %s: reading it from the start",
                        self._read_from)
            self._history, self._read_from = [], None
            return await self._read_log_once(timeout_s - _READ_ON_WAIT_S)
        before = [offset for offset in sorted(entries) if offset < end[0]]
        self._entries_read += len(before)
        self._history += [c for offset in before if (c := entries[offset]) is not None]
        self._read_from = end[0] + 1
        return list(self._history)

    async def publish(
        self, model: str, action: Action, *, seq: int | None = None, rollout: RolloutMark | None = None
    ) -> Command:
        """Sign and publish; the sequence number is the log's newest for the model plus one."""
        assert self._control is not None
        if self.signer is None:
            raise ValueError("publishing a command needs the private key (hotswap keys generate)")
        if seq is None:
            seq = max((c.seq for c in await self.read_log() if c.model == model), default=0) + 1
        command = Command(
            command_id=uuid.uuid4().hex, model=model, seq=seq, issued_at=datetime.now(UTC),
            issuer=self.issuer, action=action, rollout=rollout,
        )
        await self.publish_envelope(self.signer.sign(command).model_dump_json().encode(), command.command_id)
        return command

    async def publish_envelope(self, body: bytes, message_id: str) -> None:
        """Publish raw bytes to the control exchange (also how a forged command would arrive)."""
        assert self._control is not None
        message = aio_pika.Message(
            body, content_type="application/json", message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self._control.publish(message, routing_key="")

    @asynccontextmanager
    async def events(self) -> AsyncIterator[asyncio.Queue[Progress | Heartbeat]]:
        """Authenticated status events (progress and heartbeats) as they arrive, from now on.

        Every follower of this operator shares one private queue at the broker, made by the first
        and kept while the operator is open: a queue, its binding, a consumer and a channel made
        and closed again for each command cost the broker about 6 ms of CPU and this process 5 ms
        (measured on this project's machine), spent beside serving for every command a rollout
        or an operator's loop sends."""
        if self.workers is None:
            raise NoWorkerKey("following workers needs their public key (worker.pub, HOTSWAP_WORKER_PUBLIC_KEY)")
        await self._subscribe()
        events: asyncio.Queue[Progress | Heartbeat] = asyncio.Queue()
        self._followers.add(events)
        try:
            yield events
        finally:
            self._followers.discard(events)

    async def _subscribe(self) -> None:
        assert self._connection is not None
        async with self._subscribing:
            if self._subscribed:
                return
            # A robust channel: after a reconnect the broker gets the queue and its consumer back.
            channel = await self._connection.channel()
            queue = await Declarer(channel, self.topology).event_queue()
            await queue.consume(self._on_event, no_ack=True)
            self._subscribed = True

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        if not self._followers or self.workers is None:
            return  # nobody follows now: nothing to check it for
        try:
            event = self.workers.open_event(message.body, max_age_s=self.max_event_age_s)
        except Refused as exc:
            self._reject(exc)
            return
        for events in self._followers:
            events.put_nowait(event)

    def _reject(self, refused: Refused) -> None:
        if not self.rejected_events:
            log.warning("ignoring a status event that failed authentication: %s", refused)
        self.rejected_events[refused.kind] += 1

    async def publish_and_wait(
        self, model: str, action: Action, *, timeout_s: float = 120.0, settle_s: float | None = None,
        rollout: RolloutMark | None = None,
    ) -> WaitReport:
        """Publish, then follow every live worker until each reports an outcome or time runs out.

        Live workers are those whose heartbeat (or progress) arrives while waiting; `settle_s`
        (a little over one heartbeat interval) makes sure each has been heard from at least once.
        """
        async with self.events() as events:
            rejected_before = self.rejected_events.copy()
            command = await self.publish(model, action, rollout=rollout)
            report = WaitReport(command, time.monotonic())
            deadline = report.published_at + timeout_s
            settle = self.settle_s if settle_s is None else settle_s
            while time.monotonic() < deadline:
                settled = time.monotonic() - report.published_at >= settle
                if settled and report.workers and not report.missing:
                    break
                try:
                    event = await asyncio.wait_for(events.get(), min(0.2, max(0.0, deadline - time.monotonic())))
                except TimeoutError:
                    continue
                _record(report, event)
            report.rejected_events = self.rejected_events - rejected_before
            return report

    async def heartbeats(self, listen_s: float = 2.5) -> dict[str, Heartbeat]:
        """The latest heartbeat of every worker heard within `listen_s`."""
        seen: dict[str, Heartbeat] = {}
        async with self.events() as events:
            deadline = time.monotonic() + listen_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(events.get(), left)
                except TimeoutError:
                    break
                if isinstance(event, Heartbeat):
                    seen[event.worker_id] = event
        return seen


def _record(report: WaitReport, event: Progress | Heartbeat) -> None:
    if isinstance(event, Heartbeat):
        if event.models.get(report.command.model) is not None:
            report.heartbeats[event.worker_id] = event
    elif event.command_id == report.command.command_id:
        report.progress.setdefault(event.worker_id, []).append(event)
