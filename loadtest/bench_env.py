"""What every benchmark needs: workers in a private namespace, a load run, helper processes.

Each benchmark gets namespaces of its own (`bench-<run>-<tag>`), starts its own workers
(`HOTSWAP_MODEL_ROOT`, one torch thread, a fast heartbeat) and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from control.client import Client
from control.processes import WorkerProcess, WorkerStartFailed
from loadtest.harness import delete_namespace
from loadtest.records import Accountant, ControlEvent, JobRecord
from loadtest.report import build_report
from loadtest.runner import LoadShape, Runner
from worker.config import WorkerSettings

#: Jobs in flight per worker that keep its micro-batches full: one batch runs, one fills, and two
#: more are on their way (results back to the load generator, new jobs through the broker).
SATURATING = 4 * int(WorkerSettings.model_fields["max_batch"].default)


class BenchError(RuntimeError):
    """A benchmark could not run (a worker did not start, a helper process failed)."""


@dataclass
class BenchEnv:
    url: str
    model_root: Path
    out: Path
    device: str
    quick: bool
    console: Console
    run_id: str
    images: list[Path]
    #: jobs/s two workers sustain on shapes (closed loop); measured once, shared by benchmarks.
    capacity: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    #: Workers time their steps (`HOTSWAP_PROFILE`); benchmarks 1 and 2 print CPU per job by step.
    profile: bool = False
    #: Benchmarks 1 and 6 give the model a CPU of its own on both sides (`model_cpu`); off: `--share-cpus`.
    pin: bool = True
    #: `model_cpu`'s choice, made once: the interrupt counts it is made from keep growing.
    _quietest_cpu: int | None = field(default=None, init=False, repr=False)

    def namespace(self, tag: str) -> str:
        return f"bench-{self.run_id}-{tag}"

    @property
    def model_cpu(self) -> int | None:
        """The CPU the model runs on in benchmarks 1 and 6, in the worker (its inference thread,
        `HOTSWAP_INFERENCE_CPUS`) and in-process alike, while the load generator and a local
        broker keep off it (`harness_aside`); None with pinning off or a single CPU. Of the CPUs
        this process may use, the one that has taken the fewest device interrupts (`quietest_cpu`):
        a VM may deliver all of its disk's to one CPU, and the broker's quorum-queue writes raise
        about a thousand a second there while the pool serves."""
        allowed = os.sched_getaffinity(0)
        if not self.pin or len(allowed) < 2:
            return None
        if self._quietest_cpu is None:
            self._quietest_cpu = quietest_cpu(allowed, _interrupts())
        return self._quietest_cpu

    def model_cpu_note(self) -> str:
        if self.model_cpu is None:
            return "no CPU pinned (--share-cpus, or a single CPU): every thread of every process runs anywhere"
        return (f"the model on CPU {self.model_cpu} (of this process's, the one that has taken the fewest device "
                f"interrupts) on both sides (the worker's HOTSWAP_INFERENCE_CPUS, its other "
                f"threads on the rest; the in-process baseline pinned there), the load generator and a broker "
                f"on this host off it during the measured runs (on machines of their own they would not share "
                f"the model's core); "
                f"--share-cpus: nothing pinned")

    def worker(self, namespace: str, name: str, models: list[str], *, model_root: Path | None = None,
               public_key: Path | None = None, env: dict[str, str] | None = None) -> WorkerProcess:
        """A worker process (not started yet) with the bench's settings."""
        return WorkerProcess(
            models=models,
            log_path=self.out / "logs" / f"{namespace}-{name}.log",
            env={
                "HOTSWAP_AMQP_URL": self.url,
                "HOTSWAP_NAMESPACE": namespace,
                "HOTSWAP_MODEL_ROOT": str((model_root or self.model_root).resolve()),
                "HOTSWAP_WORKER_ID": f"{namespace}-{name}",
                "HOTSWAP_TORCH_THREADS": "1",
                "HOTSWAP_DEVICE": self.device,
                "HOTSWAP_HEARTBEAT_INTERVAL_S": "0.5",
                **({"HOTSWAP_PROFILE": "1"} if self.profile else {}),
                **({"HOTSWAP_CONTROL_PUBLIC_KEY": str(public_key)} if public_key else {}),
                **(env or {}),
            },
        )

    async def start(self, *workers: WorkerProcess, timeout_s: float = 180.0) -> None:
        started = await asyncio.gather(*(asyncio.to_thread(w.start, timeout_s) for w in workers),
                                       return_exceptions=True)
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            await self.stop(*workers)
            raise BenchError(f"a worker did not start: {failures[0]}")

    async def stop(self, *workers: WorkerProcess) -> None:
        await asyncio.gather(*(asyncio.to_thread(w.stop, 30.0) for w in workers))

    async def restart(self, worker: WorkerProcess, models: list[str], timeout_s: float = 180.0) -> WorkerProcess:
        """The traditional way: SIGTERM, wait for the exit, start again with other models, wait ready."""
        await asyncio.to_thread(worker.stop, 60.0)
        fresh = replace(worker, models=models, process=None, url="")
        try:
            await asyncio.to_thread(fresh.start, timeout_s)
        except WorkerStartFailed as exc:
            raise BenchError(f"restarted worker did not start: {exc}") from exc
        return fresh

    async def cleanup(self, namespace: str, *models: str) -> None:
        for model in models:
            await delete_namespace(self.url, namespace, model)


@dataclass
class LoadRun:
    accountant: Accountant
    started_at: float
    stopped_at: float
    report: dict[str, Any]
    producer_cpu_s: float  # this process's CPU time over the run (publishing, results, accounting)
    #: The share of the machine's CPU time that went to work over the run (everything on it: the
    #: workers, the broker, this process): how loaded "70 % of capacity" really left it.
    machine_busy: float | None = None

    @property
    def records(self) -> list[JobRecord]:
        return list(self.accountant.records.values())

    @property
    def throughput(self) -> float:
        return float(self.report["summary"]["throughput_jobs_per_s"])

    def latency(self, q: str) -> float | None:
        value = self.report["summary"]["latency_ms"][q]
        return None if value is None else float(value)

    @property
    def lost(self) -> int:
        return int(self.report["summary"]["lost"])

    @property
    def failed(self) -> int:
        return int(self.report["summary"]["failed"])


Beside = Callable[[Runner, list[ControlEvent]], Coroutine[Any, Any, None]]


async def run_load(env: BenchEnv, namespace: str, shape: LoadShape, *, beside: Beside | None = None,
                   tag: str = "", accountant: Accountant | None = None) -> LoadRun:
    """One load run through the harness's runner and accounting; `beside` runs alongside it (it may
    call `runner.stop()`), and its events go into the report."""
    accountant = Accountant() if accountant is None else accountant
    events: list[ControlEvent] = []
    name = f"hotswap-bench {env.run_id}{' ' + tag if tag else ''}"
    async with Client(env.url, namespace=namespace, observer=accountant.received, connection_name=name,
                      reply_queue_ttl_s=300) as client:
        runner = Runner(client, accountant, shape, console=env.console, show_progress=False)
        cpu, machine = time.process_time(), machine_cpu_ticks()
        alongside = asyncio.create_task(beside(runner, events)) if beside is not None else None
        if alongside is not None:  # what runs beside the load broke: the load ends with it

            def stop_on_error(task: asyncio.Task[None]) -> None:
                if task.cancelled() or task.exception() is not None:
                    runner.stop()

            alongside.add_done_callback(stop_on_error)
        try:
            with collector_paused():
                await runner.run()
                if alongside is not None:
                    await alongside
        finally:
            if alongside is not None and not alongside.done():
                alongside.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await alongside
        await runner.drain()
        cpu = time.process_time() - cpu
        busy = busy_share(machine, machine_cpu_ticks())
    assert runner.started_at is not None and runner.stopped_at is not None
    report = build_report(accountant, started_at=runner.started_at, stopped_at=runner.stopped_at, events=events,
                          checks=[], run={"namespace": namespace, "loop": shape.loop, "tag": tag})
    return LoadRun(accountant, runner.started_at, runner.stopped_at, report, cpu, busy)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process (the load generator) meanwhile, as `timeit`
    does: a full collection over a run's job records held the GIL 77 ms in benchmark 3 (measured
    with `gc.callbacks`), a pause every job in flight then counted as the system's latency."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def harness_aside(cpu: int | None) -> Iterator[None]:
    """This process's event loop thread (the load generator) and every thread of a broker on this
    machine off `cpu` meanwhile (None: no change): on a machine of their own, neither would share
    the model's core. A broker thread that ends meanwhile, or one this user may not move, stays."""
    if cpu is None:
        yield
        return
    broker = broker_pid()
    threads = [threading.get_native_id(), *(_thread_ids(broker) if broker else [])]
    before = _move_off(threads, cpu, os.sched_getaffinity(0) - {cpu})
    try:
        yield
    finally:
        for tid, cpus in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def _thread_ids(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(entry) for entry in os.listdir(f"/proc/{pid}/task")]
    return []


def _move_off(threads: list[int], cpu: int, fallback: set[int]) -> dict[int, set[int]]:
    """Each thread off `cpu` (onto `fallback` where that was its only one); what each had before."""
    before: dict[int, set[int]] = {}
    for tid in threads:
        with contextlib.suppress(OSError):
            cpus = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus - {cpu} or fallback)
            before[tid] = cpus
    return before


def quietest_cpu(allowed: set[int], interrupts: str) -> int:
    """The CPU of `allowed` that has handled the fewest device interrupts, by `/proc/interrupts`
    (the numbered lines: devices, not the timer or IPIs); of equals, the last."""
    lines = interrupts.splitlines()
    columns = [int(name.removeprefix("CPU")) for name in lines[0].split()] if lines else []
    handled = dict.fromkeys(columns, 0)
    for line in lines[1:]:
        label, _, rest = line.partition(":")
        if not label.strip().isdigit():
            continue
        for cpu, count in zip(columns, rest.split(), strict=False):
            if count.isdigit():
                handled[cpu] += int(count)
    return min(allowed, key=lambda cpu: (handled.get(cpu, 0), -cpu))


def _interrupts() -> str:
    try:
        return Path("/proc/interrupts").read_text()
    except OSError:  # not Linux: every CPU counts as quiet, so the last is chosen
        return ""


def pinned_to(cpu: int | None) -> list[str]:
    """An in-process baseline's arguments that run its model on `cpu` (None: anywhere)."""
    return [] if cpu is None else ["--cpus", str(cpu)]


def inference_cpus(cpu: int | None) -> dict[str, str]:
    """A worker's environment that gives its inference thread `cpu` (None: anywhere)."""
    return {} if cpu is None else {"HOTSWAP_INFERENCE_CPUS": str(cpu)}


def closed_loop(env: BenchEnv, model: str, seconds: float, concurrency: int = SATURATING, *,
                images: list[Path] | None = None) -> LoadShape:
    """`concurrency` jobs always in flight, with `images` (default: the held-out PNGs)."""
    return LoadShape(model=model, images=images or env.images, concurrency=concurrency, duration_s=seconds,
                     grace_s=30.0)


def open_loop(env: BenchEnv, model: str, rate: float, seconds: float, *, seed: int = 0) -> LoadShape:
    return LoadShape(model=model, images=env.images, rate=rate, duration_s=seconds, grace_s=60.0, seed=seed)


async def warm_up(env: BenchEnv, namespace: str, model: str, jobs: int = 48) -> None:
    """A few jobs first: the first inferences and the connections' set-up are not measured."""
    shape = LoadShape(model=model, images=env.images, concurrency=8, jobs=jobs, grace_s=30.0)
    run = await run_load(env, namespace, shape, tag="warm-up")
    if run.lost or run.failed:
        raise BenchError(f"warm-up on {model}: {run.lost} lost, {run.failed} failed jobs")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used, from /proc."""
    return cpu_seconds_of(f"/proc/{pid}/stat")


def cpu_seconds_of(stat_path: str) -> float:
    with open(stat_path) as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_ticks() -> tuple[int, int]:
    """Clock ticks of all the machine's CPUs so far, from /proc/stat: (busy, all). Idle and I/O
    wait are not busy; time the hypervisor gave to other guests (steal) is in all only."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time between two `machine_cpu_ticks` that went to work."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else None


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time of each thread of a process, by thread id."""
    times: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):  # a thread that ended meanwhile
            times[int(tid)] = cpu_seconds_of(f"/proc/{pid}/task/{tid}/stat")
    return times


def busiest_thread_cpu_s(before: dict[int, float], after: dict[int, float]) -> float | None:
    """CPU seconds of the thread that used the most between two snapshots (a worker's inference thread)."""
    used = [t - before.get(tid, 0.0) for tid, t in after.items()]
    return max(used) if used else None


def busiest_thread_share(before: dict[int, float], after: dict[int, float], wall_s: float) -> float | None:
    """The CPU share (of one core) of the thread that used the most CPU between two snapshots: for
    a worker, its inference thread; well under 1 while it is always busy means it waited for a core."""
    used = busiest_thread_cpu_s(before, after)
    return used / wall_s if used is not None and wall_s > 0 else None


def broker_pid() -> int | None:
    """The local RabbitMQ (Erlang VM) process, when the broker runs on this machine."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "beam.smp":
                    return int(entry)
    return None


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


async def helper_json(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run `python -m <args>` to completion; its last stdout line is a JSON object."""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", *args], capture_output=True, timeout=timeout_s, check=False
    )
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{args[0]} exited {done.returncode}: {' / '.join(tail)}")
    return dict(json.loads(lines[-1]))


class HelperProcess:
    """A long-running `python -m <args>` that prints `ready` once it serves; stopped with SIGTERM."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", *self.args], stdout=subprocess.PIPE, stderr=log)
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout_s)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            raise BenchError(f"{self.args[0]} did not start (see {self.log_path})")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, 15.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return await asyncio.to_thread(self.process.wait)
