"""The decision rule of a rollout: does the candidate pass this phase, fail it, or need more jobs?

Every gate decides on a confidence bound, never on a bare ratio, and only past a minimum sample
count: a handful of jobs neither promotes a candidate nor aborts one.

- **agreement**: the candidate's mean agreement with stable (the task's evaluator, job by job,
  0..1) over shadowed jobs. Its Wilson score interval at the plan's confidence (valid for any
  variable in [0, 1]: the variance of a mean of such is at most m(1-m)/n). Passes when the lower
  bound is at or above the floor, fails when the upper bound is below it.
- **errors**: the candidate's failure rate (jobs the model failed, primary and shadow) against
  stable's. Fails when the candidate's lower bound exceeds stable's upper bound by more than the
  allowed excess: a real difference, not one unlucky job.
- **latency**: p99 of the compute time of the batches each version's jobs ran in, at the batch
  size both ran most (a batch's time grows with its size, and a canary's batches are smaller).
  Fails when a lower confidence bound of the candidate's p99 (an order statistic whose rank is
  the binomial bound below n·0.99) exceeds the allowed ratio times an upper bound of stable's,
  plus a slack (2 ms, as validation's latency budget has) that sub-millisecond noise stays under.

A gate with too few samples says "wait"; a phase passes when every gate passes (and the phase has
been watched for its interval), fails as soon as any gate fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

from schemas.rollout import LATENCY_BOUNDS_MS, Gate, RolloutPlan

Decision = Literal["pass", "fail", "wait"]
QUANTILE = 0.99


@dataclass(frozen=True)
class Window:
    """The evidence of one phase, summed over the fleet: differences of cumulative counters."""

    candidate_jobs: int = 0
    candidate_faults: int = 0
    stable_jobs: int = 0
    stable_faults: int = 0
    agreement_count: int = 0
    agreement_total: float = 0.0
    #: Per batch size, jobs per latency bucket of their batch's compute time.
    candidate_latency: dict[int, tuple[int, ...]] = field(default_factory=dict)
    stable_latency: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    gate: Gate
    decision: Decision
    reason: str


def z_of(confidence: float) -> float:
    """The one-sided normal quantile for `confidence`."""
    return NormalDist().inv_cdf(confidence)


def wilson(successes: float, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (or of a mean of values in [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement_gate(window: Window, plan: RolloutPlan) -> Verdict:
    n = window.agreement_count
    if n < plan.min_samples:
        return Verdict("agreement", "wait", f"{n} of {plan.min_samples} shadowed jobs")
    mean = window.agreement_total / n
    low, high = wilson(window.agreement_total, n, z_of(plan.confidence))
    figures = f"mean agreement {mean:.3f} over {n} jobs, {plan.confidence:.0%} bounds [{low:.3f}, {high:.3f}]"
    if high < plan.min_agreement:
        return Verdict("agreement", "fail", f"{figures}: below the floor {plan.min_agreement:g}")
    if low >= plan.min_agreement:
        return Verdict("agreement", "pass", figures)
    return Verdict("agreement", "wait", f"{figures}: not yet sure of the floor {plan.min_agreement:g}")


def error_gate(window: Window, plan: RolloutPlan) -> Verdict:
    n = window.candidate_jobs
    if n < plan.min_samples:
        return Verdict("errors", "wait", f"{n} of {plan.min_samples} candidate jobs")
    z = z_of(plan.confidence)
    candidate_low, _ = wilson(window.candidate_faults, n, z)
    _, stable_high = wilson(window.stable_faults, window.stable_jobs, z) if window.stable_jobs else (0.0, 0.0)
    figures = (f"candidate failed {window.candidate_faults} of {n} (≥ {candidate_low:.2%}), "
               f"stable {window.stable_faults} of {window.stable_jobs} (≤ {stable_high:.2%})")
    if candidate_low > stable_high + plan.max_error_rate:
        return Verdict("errors", "fail", f"{figures}: more than {plan.max_error_rate:.2%} above stable")
    return Verdict("errors", "pass", figures)


def latency_needs(plan: RolloutPlan) -> int:
    """Batches of each version timed at one batch size before the latency gate may decide."""
    return max(20, plan.min_samples // 4)


def latency_gate(window: Window, plan: RolloutPlan) -> Verdict:
    candidate, stable = window.candidate_latency, window.stable_latency
    common = [size for size in candidate if size in stable]
    # A batch of 16 takes several times one of 1: compare the versions at the size both ran most.
    size = max(common, key=lambda s: min(sum(candidate[s]), sum(stable[s])), default=None)
    timed = 0 if size is None else min(sum(candidate[size]), sum(stable[size]))
    if size is None or timed < latency_needs(plan):
        return Verdict("latency", "wait", f"{timed} of {latency_needs(plan)} batches timed at one batch size")
    z = z_of(plan.confidence)
    candidate_low = quantile_bound(candidate[size], QUANTILE, -z, upper=False)
    stable_high = quantile_bound(stable[size], QUANTILE, z, upper=True)
    figures = f"p99 of batches of {size}: candidate ≥ {candidate_low:.2f} ms, stable ≤ {stable_high:.2f} ms"
    if candidate_low > plan.max_latency_ratio * stable_high + plan.latency_slack_ms:
        return Verdict("latency", "fail",
                       f"{figures}: more than {plan.max_latency_ratio:g}× stable + {plan.latency_slack_ms:g} ms")
    return Verdict("latency", "pass", figures)


def quantile_bound(counts: tuple[int, ...], q: float, z: float, *, upper: bool) -> float:
    """A confidence bound of the q-quantile from bucket counts: the value at rank n·q + z·√(n·q·(1-q)),
    read as the bucket's upper edge for an upper bound and its lower edge for a lower one."""
    n = sum(counts)
    rank = n * q + z * math.sqrt(n * q * (1 - q))
    rank = min(max(math.ceil(rank), 1), n)
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return _edge(index, upper=upper)
    return _edge(len(counts) - 1, upper=upper)


def _edge(index: int, *, upper: bool) -> float:
    bounds = LATENCY_BOUNDS_MS
    if upper:
        return bounds[index] if index < len(bounds) else math.inf
    return 0.0 if index == 0 else bounds[min(index, len(bounds)) - 1]


def judge(window: Window, plan: RolloutPlan, *, shadowed: bool) -> list[Verdict]:
    """Every gate's verdict on a phase; agreement only where the candidate shadowed stable."""
    verdicts = [error_gate(window, plan), latency_gate(window, plan)]
    return [agreement_gate(window, plan), *verdicts] if shadowed else verdicts


def overall(verdicts: list[Verdict]) -> Verdict | None:
    """The first failure; else None while any gate waits; else a pass naming every gate's figures."""
    failed = next((v for v in verdicts if v.decision == "fail"), None)
    if failed is not None:
        return failed
    if any(v.decision == "wait" for v in verdicts):
        return None
    return Verdict("samples", "pass", "; ".join(f"{v.gate}: {v.reason}" for v in verdicts))
