"""The latency gate (`worker.runtime.validation.check_latency`) on real trivial versions whose
batches take a known time: a clear verdict after one pass over the images, close calls measured
over every pass."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import Image
from worker.runtime.predictions import Prediction
from worker.runtime.trivial_backend import TrivialBackend, write_trivial_model
from worker.runtime.validation import LATENCY_IMAGES, LatencyBudget, ValidationFailed, check_latency

IMAGES = [np.zeros((32, 32, 3), np.uint8) for _ in range(4)]
#: Wall time: the trivial model's delay is a sleep, which a thread's CPU clock does not see.
BUDGET = LatencyBudget(factor=1.5, slack_ms=2.0, repeats=3, cpu_time=False)


class Counted(TrivialBackend):
    def __init__(self) -> None:
        super().__init__("cpu")
        self.calls = 0

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        self.calls += 1
        return super().predict(images, params)


def version(root: Path, name: str, delay_ms: float) -> Counted:
    directory = write_trivial_model(root, name, delay_ms=delay_ms)
    manifest = Manifest.model_validate_json((directory / "manifest.json").read_text())
    backend = Counted()
    backend.load(directory / manifest.artifact, manifest)
    return backend


def test_a_version_as_fast_as_the_active_one_passes_after_one_pass(tmp_path: Path) -> None:
    candidate, active = version(tmp_path, "2.0.0", 10), version(tmp_path, "1.0.0", 10)
    candidate_ms, active_ms = check_latency(candidate, active, IMAGES, BUDGET)
    assert active_ms is not None and candidate_ms < 1.2 * active_ms
    assert candidate.calls == active.calls == len(IMAGES)


def test_a_version_far_over_the_budget_fails_after_one_pass(tmp_path: Path) -> None:
    candidate, active = version(tmp_path, "2.0.0", 40), version(tmp_path, "1.0.0", 10)
    with pytest.raises(ValidationFailed, match="over the budget"):
        check_latency(candidate, active, IMAGES, BUDGET)
    assert candidate.calls == len(IMAGES)


def test_a_pass_times_at_most_latency_images_on_each_version(tmp_path: Path) -> None:
    candidate, active = version(tmp_path, "2.0.0", 10), version(tmp_path, "1.0.0", 10)
    check_latency(candidate, active, IMAGES * 3, BUDGET)
    assert candidate.calls == active.calls == LATENCY_IMAGES < len(IMAGES * 3)


def test_a_close_call_is_measured_over_every_pass(tmp_path: Path) -> None:
    # 16 ms against 1.5 × 10 + 2 = 17 allowed: within the budget, too close to decide on one pass.
    candidate, active = version(tmp_path, "2.0.0", 16), version(tmp_path, "1.0.0", 10)
    check_latency(candidate, active, IMAGES, BUDGET)
    assert candidate.calls == active.calls == BUDGET.repeats * len(IMAGES)
