"""`hotswap rollout`: a candidate version through preload, a shadow phase and canary steps, each
judged against the stable version on the same traffic (`control.gates`), then promoted; or
aborted, with traffic back on stable on every worker.

Every step is a signed command in the control log carrying the rollout's mark (plan, phase,
step): the fleet's state is always one the log explains, and an operator process that dies
leaves the fleet at its last step, from which `resume` continues. The evidence is the workers'
own (their heartbeats, `schemas.rollout`): no Prometheus needed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from control.gates import Verdict, Window, judge, overall
from control.operator import Operator, WaitReport
from schemas.control import Action, Command, Heartbeat, Shadow, Traffic, Unload, Update
from schemas.rollout import (
    LATENCY_BOUNDS_MS,
    Gate,
    ModelEvidence,
    RolloutMark,
    RolloutPhase,
    RolloutPlan,
    VersionEvidence,
)

Say = Callable[[str], None]


class RolloutError(RuntimeError):
    """The rollout cannot start or resume (said why); the fleet is left as it was."""


@dataclass
class Outcome:
    rollout_id: str
    promoted: bool
    gate: Gate | None = None
    reason: str = ""
    #: Seconds from publishing the abort to the last worker reporting it done.
    rollback_s: float | None = None
    verdicts: list[tuple[str, Verdict]] = field(default_factory=list)


@dataclass
class FleetEvidence:
    """One phase's evidence: each worker's counters now, less what they were at its first heartbeat
    of the phase (a worker restarted meanwhile, a new epoch, counts from zero)."""

    model: str
    baseline: dict[str, ModelEvidence] = field(default_factory=dict)
    latest: dict[str, ModelEvidence] = field(default_factory=dict)

    def observe(self, beat: Heartbeat) -> None:
        evidence = beat.evidence.get(self.model)
        if evidence is None:
            return
        base = self.baseline.get(beat.worker_id)
        if base is None:
            self.baseline[beat.worker_id] = evidence
        elif base.epoch != evidence.epoch:
            self.baseline[beat.worker_id] = ModelEvidence(epoch=evidence.epoch)
        self.latest[beat.worker_id] = evidence

    def window(self, plan: RolloutPlan) -> Window:
        totals = Window()
        for worker, now in self.latest.items():
            totals = _add(totals, _difference(now, self.baseline[worker], plan))
        return totals


def _difference(now: ModelEvidence, then: ModelEvidence, plan: RolloutPlan) -> Window:
    empty = VersionEvidence()
    cand_now, cand_then = now.versions.get(plan.candidate, empty), then.versions.get(plan.candidate, empty)
    stab_now, stab_then = now.versions.get(plan.stable, empty), then.versions.get(plan.stable, empty)

    def agreement(evidence: ModelEvidence) -> tuple[int, float]:
        pairs = [a for a in evidence.agreement if {a.primary, a.shadow} == {plan.stable, plan.candidate}]
        return sum(a.count for a in pairs), sum(a.total for a in pairs)

    (count_now, total_now), (count_then, total_then) = agreement(now), agreement(then)
    return Window(
        candidate_jobs=_runs(cand_now) - _runs(cand_then),
        candidate_faults=_faults(cand_now) - _faults(cand_then),
        stable_jobs=_runs(stab_now) - _runs(stab_then), stable_faults=_faults(stab_now) - _faults(stab_then),
        agreement_count=count_now - count_then, agreement_total=total_now - total_then,
        candidate_latency=_buckets(cand_now, cand_then), stable_latency=_buckets(stab_now, stab_then),
    )


def _runs(v: VersionEvidence) -> int:
    return v.served + v.shadow_runs


def _faults(v: VersionEvidence) -> int:
    return v.faults + v.shadow_faults


def _buckets(now: VersionEvidence, then: VersionEvidence) -> dict[int, tuple[int, ...]]:
    buckets = range(len(LATENCY_BOUNDS_MS) + 1)
    return {size: tuple(counts.get(i, 0) - then.latency.get(size, {}).get(i, 0) for i in buckets)
            for size, counts in now.latency.items()}


def _add(a: Window, b: Window) -> Window:
    def buckets(x: dict[int, tuple[int, ...]], y: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
        zero = (0,) * (len(LATENCY_BOUNDS_MS) + 1)
        return {size: tuple(p + q for p, q in zip(x.get(size, zero), y.get(size, zero), strict=True))
                for size in {*x, *y}}

    return Window(
        a.candidate_jobs + b.candidate_jobs, a.candidate_faults + b.candidate_faults,
        a.stable_jobs + b.stable_jobs, a.stable_faults + b.stable_faults,
        a.agreement_count + b.agreement_count, a.agreement_total + b.agreement_total,
        buckets(a.candidate_latency, b.candidate_latency), buckets(a.stable_latency, b.stable_latency),
    )


def phases(plan: RolloutPlan) -> list[tuple[RolloutPhase, int]]:
    """The rollout's steps in order: preload, shadow (if any), each canary weight below 100, promotion."""
    shadow: list[tuple[RolloutPhase, int]] = [("shadow", 0)] if plan.shadow_percent > 0 else []
    canary: list[tuple[RolloutPhase, int]] = [("canary", i) for i, w in enumerate(plan.steps) if w < 100]
    return [("preload", 0), *shadow, *canary, ("promoted", len(plan.steps) - 1)]


def action_for(plan: RolloutPlan, phase: RolloutPhase, step: int) -> Action:
    shadow = Shadow(version=plan.candidate, percent=plan.shadow_percent) if plan.shadow_percent > 0 else None
    if phase == "preload":  # loaded and validated on every worker, serving nothing yet
        return Update(version=plan.candidate, activate="standby")
    if phase == "shadow":
        return Traffic(weights={plan.stable: 100.0}, shadow=shadow)
    if phase == "canary":
        weight = plan.steps[step]
        return Traffic(weights={plan.stable: 100.0 - weight, plan.candidate: weight}, shadow=shadow)
    if phase == "promoted":  # the candidate active, stable on standby
        return Traffic(weights={plan.candidate: 100.0})
    # Aborted: unloading the candidate takes it out of the split and the shadow as well, at once.
    return Unload(version=plan.candidate)


class Rollout:
    def __init__(self, operator: Operator, model: str, plan: RolloutPlan, *, rollout_id: str | None = None,
                 say: Say = lambda _line: None, settle_s: float | None = None,
                 command_timeout_s: float = 120.0) -> None:
        self.operator = operator
        self.model = model
        self.plan = plan
        self.rollout_id = rollout_id or uuid.uuid4().hex[:12]
        self.say = say
        self.settle_s = settle_s
        self.command_timeout_s = command_timeout_s
        self.outcome = Outcome(self.rollout_id, promoted=False)

    async def run(self, start: tuple[RolloutPhase, int] | None = None) -> Outcome:
        """Every phase from `start` (default: the first); returns once promoted or aborted."""
        steps = phases(self.plan)
        first = steps.index(start) if start in steps else 0
        for phase, step in steps[first:]:
            failure = await self._enter(phase, step)
            if failure is None and phase in ("shadow", "canary"):
                failure = await self._watch(phase, step)
            if failure is not None:
                await self.abort(*failure)
                return self.outcome
        self.outcome.promoted = True
        self.say(f"promoted {self.model} {self.plan.candidate}; {self.plan.stable} on standby")
        return self.outcome

    async def abort(self, gate: Gate, reason: str) -> None:
        """Traffic back on stable everywhere, the reason in the log, the progress events and the metrics."""
        self.say(f"[red]aborting ({gate}): {reason}[/red]")
        mark = self._mark("aborted", 0, gate=gate, reason=reason)
        report = await self._publish("aborted", 0, mark)
        self.outcome.gate, self.outcome.reason = gate, reason
        self.outcome.rollback_s = _slowest(report)
        if not report.ok:
            self.say(f"[red]the abort was not confirmed by every worker: {report.failures or report.missing}[/red]")
        else:
            self.say(f"traffic back on {self.plan.stable} on {len(report.workers)} worker(s) "
                     f"in {self.outcome.rollback_s:.3f} s")

    async def _enter(self, phase: RolloutPhase, step: int) -> tuple[Gate, str] | None:
        label = _label(self.plan, phase, step)
        self.say(f"{label}: publishing")
        report = await self._publish(phase, step, self._mark(phase, step))
        if not report.workers:
            return "samples", f"{label}: no worker answered"
        if not report.ok:
            problems = {**report.failures, **dict.fromkeys(report.missing, "no outcome")}
            gate: Gate = "validation" if phase == "preload" else "samples"
            return gate, f"{label} failed on {', '.join(f'{w} ({r})' for w, r in sorted(problems.items()))}"
        return None

    async def _watch(self, phase: RolloutPhase, step: int) -> tuple[Gate, str] | None:
        """Judge the phase on heartbeats until it passes (after its interval), fails, or times out."""
        label = _label(self.plan, phase, step)
        evidence = FleetEvidence(self.model)
        started = time.monotonic()
        verdicts: list[Verdict] = []
        async with self.operator.events() as events:
            while (elapsed := time.monotonic() - started) < self.plan.step_timeout_s:
                try:
                    event = await asyncio.wait_for(events.get(), 0.5)
                except TimeoutError:
                    continue
                if not isinstance(event, Heartbeat):
                    continue
                evidence.observe(event)
                verdicts = judge(evidence.window(self.plan), self.plan, shadowed=self.plan.shadow_percent > 0)
                verdict = overall(verdicts)
                if verdict is not None and verdict.decision == "fail":
                    self.outcome.verdicts.append((label, verdict))
                    return verdict.gate, f"{label}: {verdict.reason}"
                if verdict is not None and elapsed >= self.plan.interval_s:
                    self.outcome.verdicts.append((label, verdict))
                    self.say(f"{label}: passed ({verdict.reason})")
                    return None
        waiting = "; ".join(f"{v.gate}: {v.reason}" for v in verdicts if v.decision == "wait") or "no heartbeat"
        return "samples", f"{label}: no verdict within {self.plan.step_timeout_s:g} s ({waiting})"

    async def _publish(self, phase: RolloutPhase, step: int, mark: RolloutMark) -> WaitReport:
        action = action_for(self.plan, phase, step)
        return await self.operator.publish_and_wait(self.model, action, timeout_s=self.command_timeout_s,
                                                    settle_s=self.settle_s, rollout=mark)

    def _mark(self, phase: RolloutPhase, step: int, *, gate: Gate | None = None,
              reason: str | None = None) -> RolloutMark:
        return RolloutMark(rollout_id=self.rollout_id, phase=phase, step=step, plan=self.plan, gate=gate,
                           reason=reason[:2000] if reason else None)


def last_step(commands: list[Command], model: str) -> Command:
    """The model's newest command, if it is a rollout's step that is not the end of it."""
    newest = max((c for c in commands if c.model == model), key=lambda c: c.seq, default=None)
    if newest is None or newest.rollout is None:
        raise RolloutError(f"the newest command for {model} is not a rollout step: no rollout to continue"
                           if newest else f"no command for {model} in the control log")
    if newest.rollout.phase in ("promoted", "aborted"):
        raise RolloutError(f"rollout {newest.rollout.rollout_id} of {model} is over: {newest.rollout.phase}")
    return newest


def _label(plan: RolloutPlan, phase: RolloutPhase, step: int) -> str:
    if phase == "shadow":
        return f"shadow {plan.shadow_percent:g}% on {plan.candidate}"
    if phase == "canary":
        return f"canary {plan.steps[step]:g}% to {plan.candidate}"
    return f"{phase} {plan.candidate}"


def _slowest(report: WaitReport) -> float | None:
    finals = [p.at for w in report.workers if (p := report.final(w)) is not None]
    if not finals:
        return None
    return max((at - report.command.issued_at).total_seconds() for at in finals)
