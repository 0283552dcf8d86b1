"""Wire contract of rollouts: the plan and step each rollout command carries, and the evidence
workers report in their heartbeats for the rollout to judge a candidate by.

Evidence counters are cumulative over a worker process's life (`epoch` names the process): the
rollout takes differences between two heartbeats, so a heartbeat lost or late changes nothing,
and a restarted worker (a new epoch) starts from zero again.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.manifest import VersionName

#: Upper bounds of the latency buckets, in milliseconds: 0.25 ms × 1.25ⁱ up to ~2 minutes, then
#: overflow. Fixed, so that every worker's counts add up bucket by bucket.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(round(0.25 * 1.25**i, 4) for i in range(59))


def latency_bucket(ms: float) -> int:
    """The index of the bucket `ms` falls in (len(LATENCY_BOUNDS_MS) for overflow)."""
    if ms <= LATENCY_BOUNDS_MS[0]:
        return 0
    index = math.ceil(math.log(ms / 0.25, 1.25) - 1e-9)
    return min(index, len(LATENCY_BOUNDS_MS))


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Gate = Literal["agreement", "errors", "latency", "samples", "operator", "validation"]
RolloutPhase = Literal["preload", "shadow", "canary", "promoted", "aborted"]


class RolloutPlan(_Wire):
    """What `hotswap rollout` was asked to do: carried by every step, so `--resume` needs only the log."""

    stable: VersionName
    candidate: VersionName
    shadow_percent: float = Field(ge=0, le=100,
                                  description="share of jobs also run on the candidate; 0: no shadow phase")
    steps: list[float] = Field(min_length=1, description="canary weights of the candidate, increasing, the last 100")
    interval_s: float = Field(gt=0, description="shortest time a phase is watched before it may pass")
    step_timeout_s: float = Field(gt=0, description="a phase without a verdict by then aborts (too few samples)")
    min_samples: int = Field(ge=1, description="jobs a gate needs before it may pass")
    min_agreement: float = Field(ge=0, le=1, description="floor for the candidate's mean agreement with stable")
    max_error_rate: float = Field(ge=0, le=1, description="excess failure rate over stable's")
    max_latency_ratio: float = Field(gt=0, description="ceiling for candidate p99 / stable p99")
    latency_slack_ms: float = Field(2.0, ge=0, description="added to the ceiling: sub-millisecond noise is no slowdown")
    confidence: float = Field(0.99, gt=0.5, lt=1, description="of the bounds each gate decides on")

    @model_validator(mode="after")
    def _steps_climb_to_100(self) -> RolloutPlan:
        if any(not 0 < s <= 100 for s in self.steps) or self.steps != sorted(set(self.steps)) or self.steps[-1] != 100:
            raise ValueError("steps are increasing percentages in (0, 100] ending at 100")
        if self.stable == self.candidate:
            raise ValueError("the candidate must be another version than stable")
        return self


class RolloutMark(_Wire):
    """The rollout a command is a step of. Phase `canary` with `step` i means weight steps[i]."""

    rollout_id: str = Field(min_length=1, max_length=64)
    phase: RolloutPhase
    step: int = Field(0, ge=0)
    plan: RolloutPlan
    gate: Gate | None = Field(None, description="with phase aborted: which gate failed")
    reason: str | None = Field(None, max_length=2000, description="why it passed to this phase, or aborted")


class VersionEvidence(_Wire):
    served: int = Field(0, ge=0, description="primary jobs this version answered (ok or not)")
    faults: int = Field(0, ge=0, description="of those, failed by the model (inference_failed)")
    shadow_runs: int = Field(0, ge=0)
    shadow_faults: int = Field(0, ge=0)
    latency: dict[int, dict[int, int]] = Field(
        default_factory=dict, description="per batch size, batches per LATENCY_BOUNDS_MS bucket of their "
        "compute milliseconds, past the version's first batches of that size (its warm-up); a batch's time "
        "depends on its size: versions are compared size for size")


class AgreementEvidence(_Wire):
    """Agreement (the task's evaluator, 0..1) of a shadow version with the primary, job by job."""

    primary: VersionName
    shadow: VersionName
    count: int = Field(0, ge=0)
    total: float = Field(0.0, ge=0, description="sum of the per-job agreements")


class ModelEvidence(_Wire):
    epoch: str = Field(description="the worker process these counters belong to")
    versions: dict[str, VersionEvidence] = Field(default_factory=dict)
    agreement: list[AgreementEvidence] = Field(default_factory=list)
