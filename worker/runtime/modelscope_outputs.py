"""modelscope pipeline outputs as `Prediction`s: plain arrays in the image's pixels.

Face detectors answer `{"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "keypoints": None or
[[x, y] * 5, ...]}`; the human parser `{"masks": [(h, w) floats], "labels": [names], "scores": [...]}`
with one mask per label found (semantic mode) or per part and person instance (multiple-human
parsing mode). M2FP's label 0 is the background (its own parsing drops it from the parts), and in
multiple-human parsing label `num_parsing` is a whole person.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from schemas.jobs import InferenceParams
from worker.runtime.predictions import Floats, Masks, Parts, Prediction, boxes_of


def face_prediction(output: Mapping[str, Any], params: InferenceParams) -> Prediction:
    """Faces as class 0, best first, with the request's confidence and count limits applied on top
    of the detector's own (its thresholds are fixed inside the model, e.g. ULFD's 0.85)."""
    boxes = _array(output.get("boxes"), (-1, 4))
    scores = _array(output.get("scores"), (-1,))
    landmarks = output.get("keypoints")
    points: Floats | None = None
    if landmarks is not None:
        xy = _array(landmarks, (len(boxes), -1, 2)) if len(boxes) else np.zeros((0, 5, 2), np.float32)
        # The detectors give positions only: a landmark they place counts as seen.
        points = np.concatenate([xy, np.ones((*xy.shape[:2], 1), np.float32)], axis=-1)
    order = np.argsort(-scores, kind="stable")
    keep = order[scores[order] >= params.conf][: params.max_det]
    return Prediction.of(boxes[keep], scores[keep], np.zeros(len(keep), np.int64),
                         keypoints=points[keep] if points is not None else None)


def parsing_prediction(output: Mapping[str, Any], classes: Mapping[int, str], shape: tuple[int, int],
                       background: str, person: str | None) -> Prediction:
    """Parts by the manifest's ids, the background left out; persons (the model's `person` label, boxes
    around their masks) where the model separates them."""
    ids = {name: class_id for class_id, name in classes.items()}
    part_ids: list[int] = []
    part_scores: list[float] = []
    part_masks: list[Masks] = []
    person_scores: list[float] = []
    person_masks: list[Masks] = []
    for label, score, mask in zip(output.get("labels") or [], output.get("scores") or [],
                                  output.get("masks") or [], strict=True):
        binary = np.asarray(mask) > 0.5
        if binary.shape != shape:
            raise ValueError(f"a {label} mask is {binary.shape}, the image {shape}")
        if label == person:
            person_scores.append(float(score))
            person_masks.append(binary)
        elif label != background:
            if label not in ids:
                raise ValueError(f"the model labels a part {label!r}, which the manifest's classes do not name")
            part_ids.append(ids[label])
            part_scores.append(float(score))
            part_masks.append(binary)
    parts = Parts(np.asarray(part_ids, np.int64), np.asarray(part_scores, np.float32), _stack(part_masks, shape))
    persons = _stack(person_masks, shape)
    extra: dict[str, Any] = {"masks": persons} if len(persons) else {}
    person_id = ids.get(person, 0) if person is not None else 0
    return Prediction.of(boxes_of(persons), person_scores, np.full(len(persons), person_id, np.int64), parts=parts,
                         **extra)


def _array(values: Any, shape: tuple[int, ...]) -> Floats:
    if values is None:
        return np.zeros([0 if d == -1 else d for d in shape], np.float32)
    return np.asarray(values, np.float32).reshape(shape)


def _stack(masks: list[Masks], shape: tuple[int, int]) -> Masks:
    return np.stack(masks) if masks else np.zeros((0, *shape), np.bool_)
