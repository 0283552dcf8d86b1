"""What each version answered on this worker, for rollouts to judge a candidate by.

Counted per model and version as jobs are answered (primary) and as shadow runs end: how many, how
many the model failed, the compute time of each batch they ran in (once per batch, per batch size,
past the version's warm-up for that size) in fixed buckets, and the agreement of each shadow
version with the primary it shadowed. Cumulative, reported whole in every heartbeat
(`schemas.rollout`): plain integer and float additions on the event loop, nothing per job that a
heartbeat would have to send.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from schemas.errors import ErrorCode
from schemas.rollout import AgreementEvidence, ModelEvidence, VersionEvidence, latency_bucket

#: Failures that are the model's doing; the others (a bad image, an expired deadline) would be the
#: same on any version.
MODEL_FAULTS = frozenset({ErrorCode.INFERENCE_FAILED})


@dataclass
class _Counts:
    served: int = 0
    faults: int = 0
    shadow_runs: int = 0
    shadow_faults: int = 0
    #: Batch size → latency bucket → batches.
    latency: defaultdict[int, defaultdict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))


class Evidence:
    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex[:16]
        self._versions: dict[str, dict[str, _Counts]] = defaultdict(lambda: defaultdict(_Counts))
        self._agreement: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(dict)

    def served(self, model: str, version: str, code: ErrorCode | None) -> None:
        counts = self._versions[model][version]
        counts.served += 1
        if code in MODEL_FAULTS:
            counts.faults += 1

    def batch_ran(self, model: str, version: str, size: int, ms: float) -> None:
        """A batch's compute time, told once per batch by the batcher (`MicroBatcher.on_batch`),
        past the version's warm-up for that size."""
        self._versions[model][version].latency[size][latency_bucket(ms)] += 1

    def shadowed(self, model: str, primary: str, shadow: str, agreement: float | None) -> None:
        """A shadow run ended: its agreement with the primary, None if the shadow version failed."""
        counts = self._versions[model][shadow]
        counts.shadow_runs += 1
        if agreement is None:
            counts.shadow_faults += 1
            return
        pair = self._agreement[model].setdefault((primary, shadow), [0, 0.0])
        pair[0] += 1
        pair[1] += agreement

    def report(self) -> dict[str, ModelEvidence]:
        models = set(self._versions) | set(self._agreement)
        return {model: self._model(model) for model in sorted(models)}

    def _model(self, model: str) -> ModelEvidence:
        versions = {
            name: VersionEvidence(served=c.served, faults=c.faults, shadow_runs=c.shadow_runs,
                                  shadow_faults=c.shadow_faults,
                                  latency={size: dict(buckets) for size, buckets in c.latency.items()})
            for name, c in self._versions.get(model, {}).items()
        }
        agreement = [AgreementEvidence(primary=p, shadow=s, count=int(n), total=total)
                     for (p, s), (n, total) in self._agreement.get(model, {}).items()]
        return ModelEvidence(epoch=self.epoch, versions=versions, agreement=agreement)
