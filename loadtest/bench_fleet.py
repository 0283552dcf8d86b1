"""`hotswap loadtest fleet-bounds`: the numbers that bound a fleet, measured on this broker.

    1  one queue's ceiling: classic, quorum, and a quorum queue on 3 nodes (with --cluster-url)
    2  body size against throughput through one quorum queue: jobs/s and MB/s
    3  the control plane's wire sizes: signed commands, progress events, heartbeats
    4  the control log: N commands replayed from the first entry and verified, bytes on disk
    5  status fan-out: heartbeat-sized events to K private event queues bound `#`
    6  broker memory per worker-shaped connection (rabbitmq-diagnostics memory_breakdown)

then computes from them (`loadtest/fleet_bounds.py`) how many workers a queue feeds, when to
shard, the control log over a year and what a thousand workers ask of the broker. Each step
reports its error and lets the others run; writes fleet.json.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.table import Table

from loadtest.fleet_bounds import Assumptions, Bound, Measured, all_bounds
from loadtest.fleet_plane import connection_memory, envelope_sizes, fanout, new_signer, replay
from loadtest.fleet_queue import LoopResult, QueueKind, queue_loop

KB, MB = 1_000, 1_000_000
#: About a shapes job: a 128 px PNG of the held-out set (38 KB) in base64 JSON.
JOB_BYTES = 50 * KB


@dataclass(frozen=True)
class Plan:
    """How long and how much each step runs: --quick for a smoke run, the default for the figures."""

    seconds: float
    warmup_s: float
    kinds_bytes: int
    sizes: tuple[int, ...]
    replay_entries: int
    fanout_queues: int
    fanout_s: float
    connections: int


FULL = Plan(seconds=5.0, warmup_s=1.0, kinds_bytes=1 * KB, sizes=(10 * KB, JOB_BYTES, 100 * KB, 1 * MB, 4 * MB),
            replay_entries=5000, fanout_queues=100, fanout_s=3.0, connections=200)
QUICK = Plan(seconds=1.0, warmup_s=0.3, kinds_bytes=1 * KB, sizes=(100 * KB, 1 * MB),
             replay_entries=300, fanout_queues=10, fanout_s=1.0, connections=10)


@dataclass(frozen=True)
class FleetOptions:
    url: str
    quick: bool = False
    cluster_url: str | None = None  # a 3-node cluster (`hotswap cluster start`): the replicated case
    out: Path = Path("out/fleet")
    assumptions: Assumptions = field(default_factory=Assumptions)

    @property
    def plan(self) -> Plan:
        return QUICK if self.quick else FULL


def local_broker(url: str) -> tuple[int | None, Path | None]:
    """The broker's OS pid and data directory, where `url` is this host's default broker and
    rabbitmqctl may ask it (for its CPU and the stream's bytes on disk); else nothing."""
    first = urlparse(url.split(",")[0])
    if first.hostname not in ("127.0.0.1", "localhost") or (first.port or 5672) != 5672:
        return None, None
    try:
        done = subprocess.run(["rabbitmqctl", "status", "--formatter", "json"], capture_output=True, text=True,
                              timeout=30, check=True)
        status = json.loads(done.stdout)
        return int(status["pid"]), Path(status["data_directory"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None, None


async def _queues(options: FleetOptions, measured: Measured, pid: int | None) -> None:
    plan = options.plan
    runs: list[tuple[str, QueueKind, int, int | None]] = [
        (options.url, "classic", plan.kinds_bytes, None), (options.url, "quorum", plan.kinds_bytes, None),
        *((options.url, "quorum", size, None) for size in plan.sizes),
    ]
    if options.cluster_url:
        runs.insert(2, (options.cluster_url, "quorum", plan.kinds_bytes, 3))
    for url, kind, size, replicas in runs:
        measured.loops.append(await queue_loop(url, kind, size, plan.seconds, replicas=replicas,
                                               warmup_s=plan.warmup_s, broker_pid=None if replicas else pid))


async def measure(options: FleetOptions, console: Console) -> Measured:
    plan, measured = options.plan, Measured()
    pid, data_dir = local_broker(options.url)

    async def envelopes() -> None:
        measured.envelopes = envelope_sizes(new_signer())

    async def log() -> None:
        measured.replay = await replay(options.url, plan.replay_entries, data_dir)

    async def events() -> None:
        size = measured.envelopes.get("heartbeat, no artifacts", 600)
        measured.fanout = await fanout(options.url, plan.fanout_queues, size, plan.fanout_s)

    async def memory() -> None:
        measured.memory = await connection_memory(options.url, plan.connections)

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("queues and body sizes", lambda: _queues(options, measured, pid)), ("envelope sizes", envelopes),
        ("control log replay", log), ("status fan-out", events), ("memory per connection", memory),
    ]
    for name, step in steps:
        with console.status(f"fleet bounds: {name}"):
            try:
                await step()
            except Exception as exc:  # one broken step must not hide the others' figures
                measured.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                console.print(f"[red]{name}: {type(exc).__name__}: {exc}[/red]")
    return measured


def loop_table(loops: list[LoopResult]) -> Table:
    table = Table(title="one queue: publish → consume → reply → ack (confirms, persistent)", title_justify="left")
    for column in ("queue", "body", "in flight", "jobs/s", "MB/s", "p50 ms", "client cores", "broker cores"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for r in loops:
        queue = r.kind if r.replicas == 1 else f"{r.kind} × {r.replicas} nodes"
        broker = "-" if r.broker_cores is None else f"{r.broker_cores:.2f}"
        table.add_row(queue, _size(r.body_bytes), str(r.in_flight), f"{r.jobs_per_s:,.0f}", f"{r.mb_per_s:,.1f}",
                      f"{r.p50_ms:.1f}", f"{r.client_cores:.2f}", broker)
    return table


def sizes_table(envelopes: dict[str, int]) -> Table:
    table = Table(title="control plane on the wire (signed envelopes, AMQP body)", title_justify="left")
    table.add_column("message")
    table.add_column("bytes", justify="right")
    for name, size in envelopes.items():
        table.add_row(name, str(size))
    return table


def bounds_table(bounds: list[Bound]) -> Table:
    table = Table(title="bounds (measured here, or computed from measured figures)", title_justify="left")
    for column in ("", "figure", "value", "how", "basis"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for b in bounds:
        table.add_row(b.section, b.figure, b.shown(), b.how, b.basis)
    return table


def document(measured: Measured, options: FleetOptions, bounds: list[Bound]) -> dict[str, Any]:
    loops = [{**asdict(r), "jobs_per_s": r.jobs_per_s, "mb_per_s": r.mb_per_s} for r in measured.loops]
    return {
        "at": datetime.now(UTC).isoformat(), "quick": options.quick, "cluster": options.cluster_url is not None,
        "assumptions": asdict(options.assumptions), "plan": asdict(options.plan), "errors": measured.errors,
        "loops": loops, "envelopes": measured.envelopes,
        "replay": asdict(measured.replay) if measured.replay else None,
        "fanout": asdict(measured.fanout) if measured.fanout else None,
        "memory": asdict(measured.memory) if measured.memory else None,
        "bounds": [asdict(b) for b in bounds],
    }


async def run_fleet_bounds(options: FleetOptions, console: Console) -> Measured:
    measured = await measure(options, console)
    bounds = all_bounds(measured, options.assumptions)
    if measured.loops:
        console.print(loop_table(measured.loops))
    if measured.envelopes:
        console.print(sizes_table(measured.envelopes))
    console.print(bounds_table(bounds))
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / "fleet.json"
    path.write_text(json.dumps(document(measured, options, bounds), indent=2, default=str) + "\n")
    console.print(f"figures: {path}")
    return measured


def _size(n: int) -> str:
    return f"{n / MB:g} MB" if n >= MB else f"{n / KB:g} KB"
