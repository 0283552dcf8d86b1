"""The validation gate a version passes before it may serve (docs/architecture.md, "Lifecycle").

sha256 and the isolated load happen in `ModelManager.load`; this module adds the calibration
expectations from the manifest and the latency budget against the active version. Everything
here blocks: it runs in the control executor, never on the event loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import Image, ModelBackend
from worker.runtime.evaluation import Evaluator, Score, Thresholds
from worker.runtime.images import ImageLimits, decode_image

_LIMITS = ImageLimits(max_bytes=50 * 1024 * 1024, max_pixels=100_000_000)


class ValidationFailed(Exception):
    pass


@dataclass(frozen=True)
class LatencyBudget:
    factor: float = 1.5
    #: Absolute slack, so that tiny models are not failed by timer noise.
    slack_ms: float = 2.0
    repeats: int = 3
    #: Measure the thread's CPU time, not wall time: the control thread runs at a low priority and
    #: is preempted by serving, which would count against whichever version ran then. On CPU
    #: (one torch thread, in the calling thread) CPU time is the model's cost; on a GPU it is not.
    cpu_time: bool = True

    def allowed_ms(self, baseline_ms: float) -> float:
        return baseline_ms * self.factor + self.slack_ms


@dataclass(frozen=True)
class Calibrated:
    images: list[Image]
    recall: float | None


def check_calibration(backend: ModelBackend, manifest: Manifest, version_dir: Path) -> Calibrated:
    """Run the manifest's calibration images; fail when recall is below its minimum."""
    calibration = manifest.calibration
    if calibration is None or not calibration.images:
        return Calibrated([], None)
    images = [decode_image((version_dir / item.file).read_bytes(), _LIMITS) for item in calibration.images]
    predictions = backend.predict(images, InferenceParams(conf=calibration.conf))
    if len(predictions) != len(images):
        raise ValidationFailed(f"the backend returned {len(predictions)} predictions for {len(images)} images")
    evaluator = evaluator_for(manifest)
    total = Score(0, 0)
    for item, image, prediction in zip(calibration.images, images, predictions, strict=True):
        total += evaluator.score(item.expected, prediction, image.shape[:2])
    if total.recall < calibration.min_recall:
        raise ValidationFailed(
            f"calibration recall {total.recall:.2f} is below the manifest's minimum {calibration.min_recall:.2f} "
            f"({total.found} of {total.expected} expected {_objects(manifest)} found, {_criterion(manifest)})"
        )
    return Calibrated(images, total.recall)


def check_contract(candidate: Manifest, serving: Manifest | None, allowed: bool) -> None:
    """Refuse a version that would change what producers get back, unless the command allows it."""
    if serving is None or allowed:
        return
    changes = serving.contract.changes_to(candidate.contract)
    if changes:
        raise ValidationFailed(
            f"the contract changes ({'; '.join(changes)}) from {serving.version}: producers would get another "
            "shape of answer; send the update with --new-contract if they are ready for it"
        )


def check_requirements(manifest: Manifest) -> None:
    """Refuse a version whose `requires` this worker's environment does not meet, naming each miss."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    for text in manifest.requires:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(f"{text} (installed: {installed})")
    if missing:
        raise ValidationFailed(f"this worker's environment does not meet the version's requirements: "
                               f"{', '.join(missing)}")


def evaluator_for(manifest: Manifest) -> Evaluator:
    """The evaluator of a version's task, with its calibration's thresholds."""
    calibration = manifest.calibration
    thresholds = Thresholds(calibration.match_iou, calibration.min_oks) if calibration else Thresholds()
    return Evaluator(manifest.task, manifest.classes, thresholds)


def _criterion(manifest: Manifest) -> str:
    """What counted as found, in words: which of masks, boxes or keypoints failed to match."""
    limits = evaluator_for(manifest).thresholds
    if manifest.task == "classify":
        return "as the top class"
    matched = {"segment": "mask", "human-parsing": "mask"}.get(manifest.task, "box")
    words = f"by {matched} IoU ≥ {limits.match_iou:.2f}"
    if manifest.task in ("pose", "face-detection"):
        words += f" and keypoint OKS ≥ {limits.min_oks:.2f}"
    return words


def _objects(manifest: Manifest) -> str:
    return {"human-parsing": "parts", "face-detection": "faces", "classify": "classes"}.get(manifest.task, "objects")


def median_latencies_ms(
    backends: list[ModelBackend], images: list[Image], repeats: int, clock: Callable[[], float] = time.perf_counter,
    *, enough: Callable[[list[float]], bool] | None = None,
) -> list[float]:
    """Median single-image predict time per backend, over up to `repeats` passes on the images.
    The backends take turns on every image, so a burst of load elsewhere on the machine slows them
    alike instead of whichever ran then. `enough(medians)`, asked after each pass, ends it early."""
    times: list[list[float]] = [[] for _ in backends]
    for _ in range(max(repeats, 1)):
        for image in images:
            for backend, samples in zip(backends, times, strict=True):
                started = clock()
                backend.predict([image], InferenceParams())
                samples.append((clock() - started) * 1000)
        medians = [statistics.median(samples) for samples in times]
        if enough is not None and enough(medians):
            break
    return medians


#: A verdict this far from the budget's edge (the candidate under allowed / CLEAR_MARGIN, or over
#: allowed × CLEAR_MARGIN) stands after one pass over the images; the other passes are for close
#: calls. An update to a retrained network of the same architecture thus costs one pass, not three:
#: the check was two thirds of an update's CPU (280 of 420 ms for shapes), spent beside serving.
CLEAR_MARGIN = 1.25
#: Images a pass times at most, each on both versions. The median of four single-image predicts
#: of one version on its thread's CPU clock moves by a few per cent between passes, well inside
#: CLEAR_MARGIN; a version's eight calibration images timed on both doubled the gate's cost (110
#: of an update's 300 ms of CPU for shapes, spent beside serving) for no steadier a verdict.
LATENCY_IMAGES = 4


def check_latency(
    candidate: ModelBackend, baseline: ModelBackend | None, images: list[Image], budget: LatencyBudget
) -> tuple[float, float | None]:
    """Candidate and baseline p50 in ms, measured interleaved on the same images (the first
    LATENCY_IMAGES) and thread."""
    images = images[:LATENCY_IMAGES]
    if not images:
        return 0.0, None
    clock = time.thread_time if budget.cpu_time else time.perf_counter
    if baseline is None:
        return median_latencies_ms([candidate], images, budget.repeats, clock)[0], None

    def clear(medians: list[float]) -> bool:
        candidate_ms, allowed = medians[0], budget.allowed_ms(medians[1])
        return candidate_ms * CLEAR_MARGIN <= allowed or candidate_ms >= allowed * CLEAR_MARGIN

    candidate_ms, baseline_ms = median_latencies_ms([candidate, baseline], images, budget.repeats, clock,
                                                    enough=clear)
    allowed = budget.allowed_ms(baseline_ms)
    if candidate_ms > allowed:
        raise ValidationFailed(
            f"p50 latency {candidate_ms:.1f} ms is over the budget {allowed:.1f} ms "
            f"({budget.factor}× the active version's {baseline_ms:.1f} ms + {budget.slack_ms} ms)"
        )
    return candidate_ms, baseline_ms
