"""One evaluator per task: how well a prediction finds what was expected, and how far two agree.

Validation (calibration recall), shadow runs (agreement between two versions) and the demo's
accuracy table all ask the evaluator of the version's task; nothing else compares outputs.
Objects are matched one to one, greedily, each expected object to the most similar unused
prediction of the same class:

- detect, face-detection: box IoU ≥ `match_iou`;
- segment: mask IoU ≥ `match_iou` where a mask is expected (box IoU otherwise);
- pose, and face landmarks where expected: the box as above, and keypoint similarity (COCO's OKS,
  one σ for every point) ≥ `min_oks`;
- human-parsing: each expected part by mask IoU, among the predicted parts;
- classify: the expected class is the top one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas.manifest import ExpectedObject
from worker.runtime.predictions import Floats, Masks, Prediction

#: COCO's per-keypoint σ lie between 0.025 and 0.107; without per-point values, one in between.
KEYPOINT_SIGMA = 0.07


@dataclass(frozen=True)
class Thresholds:
    match_iou: float = 0.5
    min_oks: float = 0.5


@dataclass(frozen=True)
class Score:
    found: int
    expected: int

    @property
    def recall(self) -> float:
        return self.found / self.expected if self.expected else 1.0

    def __add__(self, other: Score) -> Score:
        return Score(self.found + other.found, self.expected + other.expected)


@dataclass(frozen=True)
class _Object:
    """What matching compares, from an expectation or a prediction alike."""

    name: str
    box: Floats | None
    mask: Masks | None
    keypoints: Floats | None


Similar = Callable[[_Object, _Object], bool]


class Evaluator:
    def __init__(self, task: str, names: Mapping[int, str], thresholds: Thresholds | None = None) -> None:
        self.task = task
        self.names = names
        self.thresholds = thresholds or Thresholds()

    def score(self, expected: Sequence[ExpectedObject], prediction: Prediction,
              mask_shape: tuple[int, int] | None = None) -> Score:
        """How many expected objects the prediction finds. `mask_shape` (height, width) decodes
        expected masks; it is the image's."""
        if self.task == "classify":
            return Score(sum(self._top_class(prediction) == e.class_name for e in expected), len(expected))
        wanted = [_expected(e, mask_shape) for e in expected]
        return Score(_matched(wanted, self._objects(prediction), self._similar), len(wanted))

    def agreement(self, primary: Prediction, other: Prediction) -> float:
        """Share of objects both find (same class, similar as for recall): 1.0 when both find nothing."""
        if self.task == "classify":
            return float(self._top_class(primary) == self._top_class(other))
        mine, theirs = self._objects(primary), self._objects(other)
        if not mine and not theirs:
            return 1.0
        return _matched(mine, theirs, self._similar) / max(len(mine), len(theirs))

    def _objects(self, prediction: Prediction) -> list[_Object]:
        if self.task == "human-parsing":
            parts = prediction.parts
            if parts is None:
                return []
            return [_Object(self._name(c), None, m, None) for c, m in zip(parts.class_ids, parts.masks, strict=True)]
        masks = prediction.masks if self.task == "segment" else None
        return [
            _Object(self._name(prediction.class_ids[i]), prediction.boxes[i],
                    masks[i] if masks is not None else None,
                    prediction.keypoints[i] if prediction.keypoints is not None else None)
            for i in range(len(prediction))
        ]

    def _similar(self, want: _Object, got: _Object) -> bool:
        limits = self.thresholds
        if want.mask is not None and got.mask is not None:
            close = mask_iou(want.mask, got.mask) >= limits.match_iou
        elif want.box is not None and got.box is not None:
            close = box_iou(want.box, got.box) >= limits.match_iou
        else:
            return False
        if close and want.keypoints is not None and got.keypoints is not None and want.box is not None:
            close = oks(want.keypoints, got.keypoints, want.box) >= limits.min_oks
        return close

    def _name(self, class_id: np.int64 | int) -> str:
        return self.names.get(int(class_id), str(int(class_id)))

    def _top_class(self, prediction: Prediction) -> str | None:
        if prediction.probs is None or len(prediction.probs) == 0:
            return None
        return self._name(int(np.argmax(prediction.probs)))


def _expected(item: ExpectedObject, mask_shape: tuple[int, int] | None) -> _Object:
    mask = None
    if item.mask is not None:
        from worker.runtime.masks import decode_masks  # pycocotools only where masks are expected

        mask = decode_masks([item.mask], mask_shape or item.mask.size)[0]
    box = np.asarray(item.box, np.float32) if item.box is not None else None
    points = np.asarray(item.keypoints, np.float32) if item.keypoints is not None else None
    return _Object(item.class_name, box, mask, points)


def _matched(expected: Sequence[_Object], found: Sequence[_Object], similar: Similar) -> int:
    used: set[int] = set()
    for want in expected:
        for i, got in enumerate(found):
            if i not in used and got.name == want.name and similar(want, got):
                used.add(i)
                break
    return len(used)


def box_iou(a: Floats, b: Floats) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, float(width)) * max(0.0, float(height))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _area(box: Floats) -> float:
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def mask_iou(a: Masks, b: Masks) -> float:
    if a.shape != b.shape:
        return 0.0
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def oks(expected: npt.NDArray[np.float32], found: npt.NDArray[np.float32], box: Floats) -> float:
    """COCO object keypoint similarity over the expected visible points; 1.0 when none are labelled."""
    if expected.shape[0] != found.shape[0]:
        return 0.0
    visible = expected[:, 2] > 0
    if not visible.any():
        return 1.0
    scale = max(_area(box), 1.0)
    distances = np.sum((expected[visible, :2] - found[visible, :2]) ** 2, axis=1)
    return float(np.mean(np.exp(-distances / (2 * scale * (2 * KEYPOINT_SIGMA) ** 2))))
