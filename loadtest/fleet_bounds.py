"""The bounds of a fleet, computed from what `loadtest/bench_fleet.py` measured: pure, no I/O.

Every figure says whether it was measured here or computed (from measured ones and stated
assumptions), so that the table never passes an estimate off as a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loadtest.fleet_plane import CONNECTION_CATEGORIES, FanoutResult, MemoryResult, ReplayResult
from loadtest.fleet_queue import LoopResult

How = Literal["measured", "computed"]
#: Phases a worker reports per update (received, preload, validate, swap, done, cleanup).
PROGRESS_PER_UPDATE = 6
#: A queue run above this share of its ceiling has no room for redeliveries, bursts or a failover.
HEADROOM = 0.7
#: The stream's bound in ops/rabbitmq/definitions.json (policy hotswap-control-log, max-length-bytes).
POLICY_MAX_BYTES = 1024**3


@dataclass(frozen=True)
class Bound:
    section: str
    figure: str
    value: float | None
    unit: str
    how: How
    basis: str = ""  # how it was computed, or what was measured

    def shown(self) -> str:
        if self.value is None:
            return "-"
        v = self.value
        text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return f"{text} {self.unit}".rstrip()


@dataclass(frozen=True)
class Assumptions:
    worker_jobs_s: float = 277.0  # README Performance, bench 1: one CPU worker, shapes, micro-batch 16
    heartbeat_s: float = 2.0  # HOTSWAP_HEARTBEAT_INTERVAL_S's default
    workers: int = 1000
    updates_per_day: tuple[int, ...] = (10, 100, 1000)
    channels_per_worker: int = 4  # jobs, control log, status publisher, peer events (worker/*.py)


@dataclass
class Measured:
    loops: list[LoopResult] = field(default_factory=list)
    envelopes: dict[str, int] = field(default_factory=dict)
    replay: ReplayResult | None = None
    fanout: FanoutResult | None = None
    memory: MemoryResult | None = None
    errors: list[str] = field(default_factory=list)

    def loop(self, kind: str, body_bytes: int, replicas: int = 1) -> LoopResult | None:
        return next((r for r in self.loops if r.kind == kind and r.body_bytes == body_bytes
                     and r.replicas == replicas), None)

    def quorum_ceiling(self) -> LoopResult | None:
        """The one-node quorum queue at its smallest body: the jobs/s ceiling of one model's queue."""
        quorum = [r for r in self.loops if r.kind == "quorum" and r.replicas == 1]
        return min(quorum, key=lambda r: r.body_bytes) if quorum else None


def queue_bounds(m: Measured, a: Assumptions) -> list[Bound]:
    rows: list[Bound] = []
    ceiling = m.quorum_ceiling()
    if ceiling is None:
        return rows
    q = ceiling.jobs_per_s
    rows.append(Bound("queue", f"one quorum queue, {_size(ceiling.body_bytes)} jobs", q, "jobs/s", "measured",
                      "publish → consume → reply → ack, confirms, persistent"))
    if ceiling.broker_cores:
        rows.append(Bound("queue", "… per core of broker CPU", q / ceiling.broker_cores, "jobs/s", "computed",
                          f"{q:.0f} jobs/s ÷ {ceiling.broker_cores:.2f} broker cores measured: a leader with a "
                          "core of its own"))
    for replicated in (r for r in m.loops if r.kind == "quorum" and r.replicas > 1):
        rows.append(Bound("queue", f"quorum queue on {replicated.replicas} nodes, {_size(replicated.body_bytes)} jobs",
                          replicated.jobs_per_s, "jobs/s", "measured", "the nodes on this one host"))
    rows.append(Bound("queue", "workers one queue feeds", q / a.worker_jobs_s, "workers", "computed",
                      f"{q:.0f} jobs/s ÷ {a.worker_jobs_s:g} jobs/s per worker"))
    rows.append(Bound("queue", "shard a model above", HEADROOM * q, "jobs/s", "computed",
                      f"{HEADROOM:.0%} of the queue's ceiling"))
    for r in sorted((r for r in m.loops if r.kind == "quorum" and r.replicas == 1), key=lambda r: r.body_bytes):
        if r.body_bytes > ceiling.body_bytes:
            rows.append(Bound("queue", f"workers it feeds, {_size(r.body_bytes)} images",
                              r.jobs_per_s / a.worker_jobs_s, "workers", "computed",
                              f"{r.jobs_per_s:.0f} jobs/s, {r.mb_per_s:.0f} MB/s measured, ÷ {a.worker_jobs_s:g}: "
                              "a worker is slower on larger images, so it feeds more"))
    return rows


def control_bounds(m: Measured, a: Assumptions) -> list[Bound]:
    update = m.envelopes.get("command: update by URI + sha256")
    if update is None:
        return []
    entry: float = update
    rows = [Bound("control log", "one update command (signed envelope)", update, "B", "measured",
                  "the AMQP body Operator.publish sends")]
    if m.replay is not None and m.replay.disk_bytes:
        entry = m.replay.disk_bytes / m.replay.entries
        rows.append(Bound("control log", "on disk per command (stream segment + index)", entry, "B", "measured",
                          f"{m.replay.entries} entries of {m.envelopes.get('command: update (repository)', 0)} B"))
    marker = marker_bytes(m)
    if marker is not None:
        rows.append(Bound("control log", "on disk per sync marker", marker, "B", "measured",
                          "each worker start and each `hotswap update` (it reads the log first) leaves one"))
    per_update = entry + (marker or 0.0)
    for per_day in a.updates_per_day:
        year = per_update * per_day * 365
        rows.append(Bound("control log", f"a year at {per_day} updates/day", year / 1e6, "MB", "computed",
                          f"{per_update:.0f} B (command + marker) × {per_day} × 365; the 1 GiB policy is reached in "
                          f"{POLICY_MAX_BYTES / year:,.0f} years"))
        if m.replay is not None:
            rows.append(Bound("control log", f"replay at start-up after a year at {per_day}/day",
                              m.replay.us_per_entry * per_day * 365 / 1e6, "s", "computed",
                              f"{m.replay.us_per_entry:.0f} µs per entry measured (read + verify)"))
    return rows


def fleet_bounds(m: Measured, a: Assumptions) -> list[Bound]:
    """What `a.workers` workers ask of the broker."""
    n = a.workers
    rows = [Bound("fleet", f"connections / long-lived channels at {n} workers", n, f"/ {n * a.channels_per_worker}",
                  "computed", f"1 connection, {a.channels_per_worker} channels per worker")]
    if m.memory is not None:
        conn = m.memory.per_connection(*CONNECTION_CATEGORIES)
        queues = m.memory.per_connection("queue_procs", "stream_queue_replica_reader_procs", "quorum_queue_procs")
        rows.append(Bound("fleet", "broker memory per worker: connection + 4 channels", conn / 1e3, "kB", "measured",
                          f"{m.memory.connections} worker-shaped connections opened, memory_breakdown before/after"))
        rows.append(Bound("fleet", "… + its event queue, stream reader, consumer", queues / 1e3, "kB", "measured",
                          "queue_procs, stream reader and quorum queue categories"))
        rows.append(Bound("fleet", f"broker memory for {n} workers", (conn + queues) * n / 1e6, "MB", "computed",
                          "per worker × workers (binaries, TCP buffers not counted)"))
    beat = m.envelopes.get("heartbeat, no artifacts", 0)
    full = max((v for k, v in m.envelopes.items() if k.startswith("heartbeat,")), default=beat)
    per_s = n / a.heartbeat_s
    rows.append(Bound("fleet", "heartbeats published", per_s, "/s", "computed",
                      f"{n} workers every {a.heartbeat_s:g} s"))
    rows.append(Bound("fleet", "heartbeat deliveries (every worker's event queue binds #)", per_s * n, "/s",
                      "computed", f"{per_s:.0f}/s × {n} queues"))
    rows.append(Bound("fleet", "heartbeat bytes delivered", per_s * n * beat / 1e6, "MB/s", "computed",
                      f"{beat} B each ({full} B with 64 artifacts: {per_s * n * full / 1e6:,.0f} MB/s)"))
    if m.fanout is not None:
        rows.append(Bound("fleet", f"fan-out measured here ({m.fanout.queues} event queues)",
                          m.fanout.deliveries_per_s, "deliveries/s", "measured",
                          f"{m.fanout.body_bytes} B events, one Python process consuming "
                          f"({m.fanout.client_cores:.2f} cores): a floor, not the broker's ceiling"))
    rows.append(Bound("fleet", "progress deliveries per update", PROGRESS_PER_UPDATE * n * n, "", "computed",
                      f"{PROGRESS_PER_UPDATE} phases × {n} workers × {n} event queues, in a burst"))
    marker = marker_bytes(m)
    if marker is not None:
        rows.append(Bound("fleet", f"log growth from {n} workers starting once a day", marker * n * 365 / 1e6,
                          "MB/year", "computed", f"{marker:.0f} B × {n} × 365: {n * 365:,} entries every replay reads"))
    if m.replay is not None:
        year = a.updates_per_day[0] * 365
        rows.append(Bound("fleet", f"{n} workers starting, log of {year} commands", _log_bytes(m, year) * n / 1e6,
                          "MB read", "computed", f"{m.replay.us_per_entry * year / 1e3:.0f} ms of replay each"))
    return rows


def marker_bytes(m: Measured) -> float | None:
    if m.replay is None or m.replay.marker_disk_bytes is None or not m.replay.markers:
        return None
    return m.replay.marker_disk_bytes / m.replay.markers


def _log_bytes(m: Measured, entries: int) -> float:
    if m.replay is not None and m.replay.disk_bytes:
        return m.replay.disk_bytes / m.replay.entries * entries
    return m.envelopes.get("command: update by URI + sha256", 0) * entries


def all_bounds(m: Measured, a: Assumptions) -> list[Bound]:
    return [*queue_bounds(m, a), *control_bounds(m, a), *fleet_bounds(m, a)]


def _size(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 1_000_000 else f"{n / 1e3:g} KB"
