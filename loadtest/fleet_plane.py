"""What a fleet costs the broker besides its jobs: the control log, status events, connections.

- `envelope_sizes`: the bytes of real signed commands, as `Operator.publish` puts them on the
  wire, and of signed progress events and heartbeats, as `worker/control.py` does.
- `replay`: a throwaway control log (declared by `worker/declarer.py`) filled with N commands,
  then read from its first entry and verified, as a starting worker does; its bytes on disk.
- `fanout`: heartbeat-sized events through a status exchange to K private event queues (each
  worker's peer listener binds `#`: every worker gets every worker's heartbeats).
- `connection_memory`: the broker's memory before and after N worker-shaped connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.control import (
    MAX_ANNOUNCED_ARTIFACTS,
    Action,
    ArtifactRef,
    Command,
    Heartbeat,
    ModelStatus,
    Progress,
    Rollback,
    Traffic,
    Update,
    VersionStatus,
)
from schemas.signing import Signer
from schemas.topology import SYNC_TYPE, Topology
from worker.connections import connect
from worker.declarer import FROM_THE_START, Declarer

SHA = "9f2c" * 16  # any sha256: every one is 64 hex digits
ACTIONS: dict[str, Action] = {
    "update (repository)": Update(version="2.0.0"),
    "update by URI + sha256": Update(version="3.0.0", artifact=ArtifactRef(
        uri="https://artifacts.example/shapes/3.0.0/model.safetensors", sha256=SHA)),
    "canary 10 %": Update(version="3.0.0", activate="canary", canary_percent=10.0),
    "traffic 90/10": Traffic(weights={"2.0.0": 90.0, "3.0.0": 10.0}),
    "rollback": Rollback(),
}


def signed_command(signer: Signer, action: Action, seq: int = 1234) -> bytes:
    """The wire bytes of one command, exactly as `Operator.publish` makes them."""
    command = Command(command_id=uuid.uuid4().hex, model="shapes", seq=seq, issued_at=datetime.now(UTC),
                      issuer="operator", action=action)
    return signer.sign(command).model_dump_json().encode()


def heartbeat(artifacts: int) -> Heartbeat:
    """A worker serving one model, active and one standby warm, announcing `artifacts` sha256s."""
    versions = {"2.0.0": VersionStatus(state="active", weight=100.0), "1.0.0": VersionStatus(state="standby")}
    return Heartbeat(worker_id=f"{socket.gethostname()}-123456", at=datetime.now(UTC),
                     models={"shapes": ModelStatus(active="2.0.0", versions=versions, last_seq=1234)},
                     peer_url="http://10.0.12.34:8080", artifacts=[SHA] * artifacts)


def envelope_sizes(signer: Signer) -> dict[str, int]:
    """Bytes on the wire (the AMQP body) of each kind of command and status event."""
    sizes = {f"command: {name}": len(signed_command(signer, action)) for name, action in ACTIONS.items()}
    progress = Progress(worker_id=f"{socket.gethostname()}-123456", command_id=uuid.uuid4().hex, model="shapes",
                        seq=1234, phase="validate", seconds=1.234, at=datetime.now(UTC))
    sizes["progress event"] = len(signer.sign_event(progress))
    sizes["heartbeat, no artifacts"] = len(signer.sign_event(heartbeat(0)))
    most = MAX_ANNOUNCED_ARTIFACTS
    sizes[f"heartbeat, {most} artifacts"] = len(signer.sign_event(heartbeat(most)))
    return sizes


def new_signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@dataclass(frozen=True)
class ReplayResult:
    entries: int
    replay_s: float  # read from the first entry and verified, up to a marker published after
    disk_bytes: int | None  # the stream's segment and index files, where the broker's data dir is here
    #: Empty sync markers appended afterwards (every worker start and every `hotswap update` leaves
    #: one: worker/control.py, Operator.read_log), and the bytes on disk they added.
    markers: int = 0
    marker_disk_bytes: int | None = None

    @property
    def us_per_entry(self) -> float:
        return 1e6 * self.replay_s / self.entries


async def replay(url: str, entries: int, data_dir: Path | None) -> ReplayResult:
    """Fill a throwaway control log with `entries` signed updates, then replay it as a worker does."""
    topology = Topology(f"hotswap-fleetbench-{uuid.uuid4().hex[:8]}")
    signer = new_signer()
    verifier = signer.verifier()
    connection = await connect(url, "hotswap-fleetbench control log", attempts=1)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange, _ = await Declarer(channel, topology).control()
        bodies = [signed_command(signer, Update(version="2.0.0"), seq=i + 1) for i in range(entries)]
        for start in range(0, entries, 200):  # confirmed in windows, as fast as the broker takes them
            await asyncio.gather(*(exchange.publish(aio_pika.Message(body, content_type="application/json",
                                                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                                    routing_key="") for body in bodies[start:start + 200]))
        reader = await connection.channel()
        await reader.set_qos(prefetch_count=256)  # as worker/control.py reads it
        marker, done, seen = uuid.uuid4().hex, asyncio.Event(), [0]

        async def on_entry(message: AbstractIncomingMessage) -> None:
            await message.ack()
            if message.type == SYNC_TYPE:
                if message.message_id == marker:
                    done.set()
                return
            verifier.open(message.body)  # a worker checks every entry's signature and schema
            seen[0] += 1

        started = time.monotonic()
        _, log = await Declarer(reader, topology).control()
        await log.consume(on_entry, arguments=FROM_THE_START)
        await exchange.publish(aio_pika.Message(b"", type=SYNC_TYPE, message_id=marker), routing_key="")
        await asyncio.wait_for(done.wait(), timeout=120)
        replay_s = time.monotonic() - started
        await reader.close()
        disk = stream_disk_bytes(data_dir, topology.control_log) if data_dir else None
        markers = max(1, entries // 5)
        await _append_markers(channel, topology, markers)
        after = stream_disk_bytes(data_dir, topology.control_log) if data_dir else None
        await channel.queue_delete(topology.control_log)
        await channel.exchange_delete(topology.control_exchange)
    marker_bytes = None if disk is None or after is None else after - disk
    return ReplayResult(entries=seen[0], replay_s=replay_s, disk_bytes=disk, markers=markers,
                        marker_disk_bytes=marker_bytes)


async def _append_markers(channel: AbstractChannel, topology: Topology, count: int) -> None:
    """Sync markers as a starting worker writes them: through the default exchange, into the stream."""
    for start in range(0, count, 200):
        await asyncio.gather(*(channel.default_exchange.publish(
            aio_pika.Message(b"", type=SYNC_TYPE, message_id=uuid.uuid4().hex), routing_key=topology.control_log)
            for _ in range(min(200, count - start))))


def stream_disk_bytes(data_dir: Path, queue: str) -> int | None:
    """The files of a stream's directory (`<data>/stream/<vhost>_<name>_<time>`), None if not readable."""
    try:
        found = [d for d in (data_dir / "stream").iterdir() if f"_{queue.replace('.', '_')}_" in d.name]
        return sum(f.stat().st_size for d in found for f in d.iterdir()) if found else None
    except OSError:
        return None


@dataclass(frozen=True)
class FanoutResult:
    queues: int
    body_bytes: int
    published: int
    delivered: int
    seconds: float
    client_cores: float

    @property
    def deliveries_per_s(self) -> float:
        return self.delivered / self.seconds


async def fanout(url: str, queues: int, body_bytes: int, seconds: float) -> FanoutResult:
    """Events of `body_bytes` to `queues` private event queues (bound `#`), consumed as peers do."""
    topology = Topology(f"hotswap-fleetbench-{uuid.uuid4().hex[:8]}")
    consumers = [await connect(url, f"hotswap-fleetbench listener {i}", attempts=1) for i in range(4)]
    delivered = [0]

    async def on_event(_: AbstractIncomingMessage) -> None:
        delivered[0] += 1

    publisher = await connect(url, "hotswap-fleetbench status", attempts=1)
    try:
        for i in range(queues):  # spread over a few connections: one per worker would measure the client
            channel = await consumers[i % len(consumers)].channel()
            queue = await Declarer(channel, topology).event_queue()
            await queue.consume(on_event, no_ack=True)
        channel = await publisher.channel(publisher_confirms=True)
        exchange = await Declarer(channel, topology).status_exchange()
        body, published = os.urandom(body_bytes), 0
        cpu0, start = time.process_time(), time.monotonic()
        while time.monotonic() - start < seconds:
            await asyncio.gather(*(exchange.publish(aio_pika.Message(body), routing_key=f"heartbeat.w{n}")
                                   for n in range(16)))
            published += 16
        counted, wall = delivered[0], time.monotonic() - start
        cores = (time.process_time() - cpu0) / wall
        await channel.exchange_delete(topology.status_exchange)
    finally:
        await publisher.close()
        for connection in consumers:
            await connection.close()
    return FanoutResult(queues=queues, body_bytes=body_bytes, published=published, delivered=counted,
                        seconds=wall, client_cores=cores)


@dataclass(frozen=True)
class MemoryResult:
    connections: int
    channels_each: int
    before: dict[str, int]
    after: dict[str, int]

    def per_connection(self, *categories: str) -> float:
        """Bytes per connection the given categories grew by (none given: all but unallocated)."""
        keys = categories or tuple(k for k in self.after if k not in ("reserved_unallocated", "allocated_unused"))
        return sum(self.after.get(k, 0) - self.before.get(k, 0) for k in keys) / self.connections


CONNECTION_CATEGORIES = ("connection_readers", "connection_writers", "connection_channels", "connection_other")


def memory_breakdown(node_args: tuple[str, ...] = ()) -> dict[str, int] | None:
    """`rabbitmq-diagnostics memory_breakdown` in bytes per category, None where the CLI cannot ask."""
    try:
        done = subprocess.run(["rabbitmq-diagnostics", *node_args, "memory_breakdown", "--formatter", "json"],
                              capture_output=True, text=True, timeout=60, check=True)
        return {k: int(v["bytes"]) for k, v in json.loads(done.stdout).items()}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None


async def connection_memory(url: str, connections: int) -> MemoryResult | None:
    """N worker-shaped connections: 4 channels each, a consumer on one job queue (prefetch 32),
    one on the control log from its first entry, a private event queue bound `#`, a status
    publisher; the broker's memory categories before and after."""
    topology = Topology(f"hotswap-fleetbench-{uuid.uuid4().hex[:8]}")
    setup = await connect(url, "hotswap-fleetbench memory", attempts=1)
    opened: list[AbstractRobustConnection] = []
    try:
        declarer = Declarer(await setup.channel(), topology)
        await declarer.job_queue("fleetbench", delivery_limit=3)
        await declarer.control()
        await declarer.status_exchange()
        await asyncio.sleep(1.0)
        before = await asyncio.to_thread(memory_breakdown)
        if before is None:
            return None
        for i in range(connections):
            opened.append(await _worker_shaped(url, topology, i))
        await asyncio.sleep(2.0)  # connection and channel processes settle
        after = await asyncio.to_thread(memory_breakdown)
    finally:
        for connection in opened:
            await connection.close()
        async with setup:
            channel = await setup.channel()
            for name in (topology.job_queue("fleetbench"), topology.dead_letter_queue("fleetbench"),
                         topology.control_log):
                await channel.queue_delete(name)
            for exchange in (topology.jobs_exchange, topology.dead_letter_exchange, topology.control_exchange,
                             topology.status_exchange):
                await channel.exchange_delete(exchange)
    return None if after is None else MemoryResult(connections, 4, before, after)


async def _worker_shaped(url: str, topology: Topology, index: int) -> AbstractRobustConnection:
    connection = await connect(url, f"hotswap-fleetbench worker-shaped {index}", attempts=1)

    async def ignore(message: AbstractIncomingMessage) -> None:
        await message.ack()

    async def drop(_: AbstractIncomingMessage) -> None:
        return None

    jobs = await connection.channel(publisher_confirms=True)
    await jobs.set_qos(prefetch_count=32)
    await (await jobs.get_queue(topology.job_queue("fleetbench"))).consume(ignore)
    control = await connection.channel()
    await control.set_qos(prefetch_count=256)
    await (await control.get_queue(topology.control_log)).consume(ignore, arguments=FROM_THE_START)
    await connection.channel(publisher_confirms=False)  # the status publisher: idle between heartbeats
    events = await connection.channel()
    await (await Declarer(events, topology).event_queue()).consume(drop, no_ack=True)
    return connection
