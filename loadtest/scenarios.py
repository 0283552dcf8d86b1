"""What happens to the system while the load runs.

Each scenario has three steps: `prepare` (before the load), `during` (alongside it, acting at
fractions of its progress) and `finish` (after the results are in: its checks). Everything it
does is recorded as a `ControlEvent`, marked on the plot.

* `steady`: nothing.
* `update`: N hot updates alternating between the two versions, each followed to its outcome.
* `rollback`: update to the second version, then roll back; N times.
* `ab`: split traffic by the weights before the load; afterwards, compare each version's share
  of the answered jobs with its weight, then put all traffic back on the version active before.
* `kill-worker`: SIGKILL one of the workers the harness started, 40 % into the load.
* `broker-restart`: 40 % into the load, the broker application restarts (scope `restart`, the
  default: `rabbitmqctl stop_app`, `start_app`; every connection drops, transient queues and
  messages are gone, durable ones recover). Scope `run` only closes the run's connections
  (`rabbitmqctl close_connection`), scope `all` every connection (`close_all_connections`):
  clients see what a restart shows them, but queues and messages stay. rabbitmqctl acts on the
  broker of this machine.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from control.operator import Operator, WaitReport
from control.processes import WorkerProcess
from loadtest.records import Accountant, Check, ControlEvent
from schemas.control import Action, Rollback, Traffic, Update
from schemas.signing import Signer, Verifier

BrokerScope = Literal["run", "all", "restart"]
SCENARIOS = ("steady", "update", "rollback", "ab", "kill-worker", "broker-restart")
FAULT_AT = 0.4  # the fraction of the load at which faults are injected
_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


class ScenarioError(RuntimeError):
    """The scenario cannot run as configured (no key, no workers, no control plane)."""


@dataclass
class ScenarioContext:
    url: str
    namespace: str
    model: str
    accountant: Accountant
    progress: Callable[[], float]
    versions: tuple[str, str]
    signer: Signer | None = None
    worker_verifier: Verifier | None = None  # the workers' status events are believed only with it
    workers: list[WorkerProcess] = field(default_factory=list)  # started by the harness
    connection_names: list[str] = field(default_factory=list)  # this run's AMQP connections
    updates: int = 2
    weights: dict[str, float] | None = None
    command_timeout_s: float = 120.0
    settle_s: float = 2.5  # a little over one heartbeat interval
    broker_scope: BrokerScope = "restart"
    events: list[ControlEvent] = field(default_factory=list)
    commands: list[tuple[str, WaitReport, str]] = field(default_factory=list)  # label, report, outcome
    active_before: str | None = None
    operator: Operator | None = None

    def mark(self, label: str, kind: Literal["control", "fault", "info"] = "control",
             ok: bool | None = None, at: float | None = None) -> ControlEvent:
        event = ControlEvent(time.monotonic() if at is None else at, label, kind, ok)
        self.events.append(event)
        return event

    async def at(self, fraction: float) -> None:
        while self.progress() < fraction:
            await asyncio.sleep(0.05)

    async def command(self, action: Action, label: str) -> WaitReport:
        """Publish a signed command and follow every live worker to its outcome."""
        assert self.operator is not None
        self.mark(f"{label} published")
        report = await self.operator.publish_and_wait(
            self.model, action, timeout_s=self.command_timeout_s, settle_s=self.settle_s
        )
        outcome = "done" if report.ok else "FAILED: " + "; ".join(
            [*(f"{w} {r}" for w, r in report.failures.items()), *(f"{w} no answer" for w in report.missing)]
            or ["no worker answered"]
        )
        self.commands.append((label, report, outcome))
        self.mark(f"{label} {outcome} ({_workers(len(report.workers))})", ok=report.ok)
        return report


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


class Scenario:
    name: ClassVar[str] = "steady"
    uses_control: ClassVar[bool] = False
    min_workers: ClassVar[int] = 0  # workers the harness must start itself

    async def prepare(self, ctx: ScenarioContext) -> None:
        if not self.uses_control:
            return
        if ctx.signer is None:
            raise ScenarioError(f"{self.name} signs control commands: give --key (or HOTSWAP_CONTROL_KEY)")
        if ctx.worker_verifier is None:
            raise ScenarioError(f"{self.name} follows the workers: give their public key (--worker-key, "
                                "HOTSWAP_WORKER_PUBLIC_KEY; default worker.pub beside --key)")
        ctx.operator = Operator(ctx.url, namespace=ctx.namespace, signer=ctx.signer, issuer="loadtest",
                                workers=ctx.worker_verifier)
        await ctx.operator.__aenter__()
        beats = await ctx.operator.heartbeats(listen_s=ctx.settle_s)
        actives = Counter(m.active for b in beats.values() if (m := b.models.get(ctx.model)) and m.active)
        if not actives:
            raise ScenarioError(f"no worker serving {ctx.model} sent a heartbeat in {ctx.settle_s} s: "
                                "is the control plane on (HOTSWAP_CONTROL_PUBLIC_KEY)?")
        ctx.active_before = actives.most_common(1)[0][0]
        ctx.mark(f"{_workers(len(beats))}, {ctx.model} active {ctx.active_before}", kind="info")

    async def during(self, ctx: ScenarioContext) -> None:
        return None

    async def finish(self, ctx: ScenarioContext) -> list[Check]:
        checks = [Check(label, report.ok, outcome) for label, report, outcome in ctx.commands]
        if ctx.operator is not None:
            await ctx.operator.__aexit__(None, None, None)
            ctx.operator = None
        return checks

    def expected_version_check(self, ctx: ScenarioContext, version: str) -> Check:
        """Jobs submitted after the last command was done everywhere ran on its version."""
        done = max((e.at for e in ctx.events if e.ok), default=None)
        after = [r for r in ctx.accountant.records.values() if done is not None and r.submitted_at > done
                 and r.status == "ok"]
        wrong = Counter(r.version for r in after if r.version != version)
        detail = f"{len(after)} jobs after the last command, other versions: {dict(wrong) or 'none'}"
        return Check(f"jobs after the last command served by {version}", not wrong, detail)


class Steady(Scenario):
    name = "steady"


class HotUpdates(Scenario):
    name = "update"
    uses_control = True

    async def during(self, ctx: ScenarioContext) -> None:
        for i in range(ctx.updates):
            await ctx.at((i + 1) / (ctx.updates + 1))
            version = ctx.versions[(i + 1) % 2]
            await ctx.command(Update(version=version), f"update → {version}")

    async def finish(self, ctx: ScenarioContext) -> list[Check]:
        final = ctx.versions[ctx.updates % 2]
        return [*await super().finish(ctx), self.expected_version_check(ctx, final)]


class Rollbacks(Scenario):
    name = "rollback"
    uses_control = True

    async def during(self, ctx: ScenarioContext) -> None:
        steps = 2 * ctx.updates
        for i in range(ctx.updates):
            await ctx.at((2 * i + 1) / (steps + 1))
            await ctx.command(Update(version=ctx.versions[1]), f"update → {ctx.versions[1]}")
            await ctx.at((2 * i + 2) / (steps + 1))
            await ctx.command(Rollback(), "rollback")

    async def finish(self, ctx: ScenarioContext) -> list[Check]:
        assert ctx.active_before is not None
        return [*await super().finish(ctx), self.expected_version_check(ctx, ctx.active_before)]


class AbSplit(Scenario):
    name = "ab"
    uses_control = True

    async def prepare(self, ctx: ScenarioContext) -> None:
        await super().prepare(ctx)
        weights = ctx.weights or {ctx.versions[0]: 50.0, ctx.versions[1]: 50.0}
        ctx.weights = weights
        await ctx.command(Traffic(weights=weights), "traffic " + " ".join(f"{v}={w:g}" for v, w in weights.items()))

    async def finish(self, ctx: ScenarioContext) -> list[Check]:
        assert ctx.weights is not None and ctx.active_before is not None
        served = Counter(r.version for r in ctx.accountant.records.values() if r.status == "ok")
        total = sum(served.values())
        checks = []
        for version, weight in ctx.weights.items():
            expected = weight / 100
            observed = served.get(version, 0) / total if total else 0.0
            # Four standard deviations of a binomial share, and never under five points.
            tolerance = max(0.05, 4 * math.sqrt(expected * (1 - expected) / max(total, 1)))
            checks.append(Check(
                f"share of {version}", total > 0 and abs(observed - expected) <= tolerance,
                f"observed {observed:.1%} of {total} ok jobs, weight {expected:.0%} (± {tolerance:.1%})",
            ))
        await ctx.command(Traffic(weights={ctx.active_before: 100.0}), f"traffic restored → {ctx.active_before}")
        return [*checks, *await super().finish(ctx)]


class KillWorker(Scenario):
    name = "kill-worker"
    min_workers = 2

    async def during(self, ctx: ScenarioContext) -> None:
        await ctx.at(FAULT_AT)
        victim = ctx.workers[0]
        pid = victim.process.pid if victim.process is not None else None
        await asyncio.to_thread(victim.kill)
        ctx.mark(f"SIGKILL {victim.env.get('HOTSWAP_WORKER_ID', 'worker')} (pid {pid})", kind="fault")


class BrokerRestart(Scenario):
    name = "broker-restart"

    def __init__(self) -> None:
        self.done: str | None = None  # what was done to the broker, once done

    async def prepare(self, ctx: ScenarioContext) -> None:
        if shutil.which("rabbitmqctl") is None:
            raise ScenarioError("broker-restart needs rabbitmqctl on this machine")

    async def during(self, ctx: ScenarioContext) -> None:
        await ctx.at(FAULT_AT)
        at = time.monotonic()
        try:
            if ctx.broker_scope == "restart":
                self.done = f"broker application restarted (stop_app, start_app: {await restart_broker():.1f} s)"
            else:
                self.done = await _close_connections(ctx)
        except RuntimeError as exc:
            ctx.mark(f"broker-restart ({ctx.broker_scope}) failed: {exc}", kind="fault", ok=False, at=at)
            return
        ctx.mark(self.done, kind="fault", ok=True, at=at)

    async def finish(self, ctx: ScenarioContext) -> list[Check]:
        if self.done is None:
            fault = next((e.label for e in ctx.events if e.kind == "fault"), "the load ended before the fault")
            return [Check(f"broker-restart ({ctx.broker_scope})", False, fault)]
        return [Check(f"broker-restart ({ctx.broker_scope})", True, self.done)]


async def _close_connections(ctx: ScenarioContext) -> str:
    """Close the run's connections (or all of them); what was done, for the report."""
    found = await list_connections(ctx.broker_scope, ctx.connection_names)
    await close_connections(ctx.broker_scope, found)
    missing = [] if ctx.broker_scope == "all" else sorted(set(ctx.connection_names) - set(found.values()))
    if not found or missing:
        raise RuntimeError(f"connections not found: {', '.join(missing) or 'any of this run'}")
    what = "all its connections" if ctx.broker_scope == "all" else f"the run's {len(found)} connections"
    return f"broker closed {what}; not a restart"


async def restart_broker() -> float:
    """Restart the RabbitMQ application of this machine's node; the seconds it took. Whatever
    happens after `stop_app`, `start_app` is tried: the broker is never left stopped."""
    started = time.monotonic()
    try:
        await rabbitmqctl("stop_app")
    finally:
        await rabbitmqctl("start_app")  # a no-op when the application is still running
        await rabbitmqctl("await_startup")
    return time.monotonic() - started


async def rabbitmqctl(*args: str) -> str:
    """`rabbitmqctl --quiet ARGS` on this machine's node, its output; raises with its error."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "--quiet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]}: {err.decode(errors='replace').strip() or process.returncode}")
    return out.decode(errors="replace")


async def list_connections(scope: BrokerScope, names: list[str]) -> dict[str, str]:
    """The broker's connections (pid → connection name) among `names`, or all of them."""
    found: dict[str, str] = {}
    for line in (await rabbitmqctl("list_connections", "pid", "client_properties")).splitlines():
        pid, _, properties = line.partition("\t")
        if not pid.startswith("<"):
            continue  # the header
        named = _CONNECTION_NAME.search(properties)
        name = named.group(1) if named else ""
        if scope == "all" or name in names:
            found[pid] = name
    return found


async def close_connections(scope: BrokerScope, found: dict[str, str]) -> None:
    """Have the broker close these connections (with scope `all`: every connection it has)."""
    reason = "hotswap loadtest: broker-restart scenario"
    if scope == "all":
        await rabbitmqctl("close_all_connections", reason)
    else:
        await asyncio.gather(*(rabbitmqctl("close_connection", pid, reason) for pid in found))


def scenario(name: str) -> Scenario:
    kinds: dict[str, type[Scenario]] = {
        s.name: s for s in (Steady, HotUpdates, Rollbacks, AbSplit, KillWorker, BrokerRestart)
    }
    if name not in kinds:
        raise ScenarioError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    return kinds[name]()

