"""A prediction's arrays ↔ the wire: `detections` and the task's `output` (`schemas.outputs`).

The job processor encodes each prediction once, on the event loop, after inference; masks become
COCO RLE (pycocotools, C). The reverse, `prediction_of`, lets anything holding results (the demo's
accuracy table, tests, rollout gates) hand them to the same evaluators the worker uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from schemas.jobs import Box, Detection, JobResult
from schemas.manifest import ExpectedObject, Manifest
from schemas.outputs import (
    FACE_LANDMARKS,
    ClassifyOutput,
    ClassScore,
    DetectOutput,
    FaceOutput,
    Keypoint,
    LabelledMask,
    ParsingOutput,
    PoseOutput,
    SegmentOutput,
    TaskOutput,
)
from worker.runtime.evaluation import Evaluator, Score, Thresholds
from worker.runtime.masks import decode_masks, encode_masks
from worker.runtime.predictions import Parts, Prediction

#: A classifier's answer lists this many classes.
TOP_CLASSES = 5


def to_wire(prediction: Prediction, manifest: Manifest) -> tuple[list[Detection], TaskOutput]:
    """The result's `detections` and `output` for a prediction of a version with this manifest."""
    names = manifest.classes
    detections = [
        Detection(class_id=int(c), class_name=names.get(int(c), str(int(c))), score=float(s), box=Box.of(b))
        for b, s, c in zip(prediction.boxes.tolist(), prediction.scores.tolist(), prediction.class_ids.tolist(),
                           strict=True)
    ]
    return detections, _output(prediction, manifest)


def _output(prediction: Prediction, manifest: Manifest) -> TaskOutput:
    task = manifest.task
    if task == "segment":
        masks = prediction.masks if prediction.masks is not None else np.zeros((len(prediction), 0, 0), np.bool_)
        return SegmentOutput(masks=encode_masks(masks))
    if task == "pose":
        return PoseOutput(keypoint_names=list(manifest.keypoints or ()), skeleton=list(manifest.skeleton or ()),
                          keypoints=_points(prediction))
    if task == "face-detection":
        return FaceOutput(landmark_names=list(manifest.keypoints or FACE_LANDMARKS), landmarks=_points(prediction))
    if task == "human-parsing":
        parts = prediction.parts
        labelled = [] if parts is None else [
            LabelledMask(class_id=int(c), class_name=manifest.classes.get(int(c), str(int(c))), score=float(s), mask=m)
            for c, s, m in zip(parts.class_ids.tolist(), parts.scores.tolist(), encode_masks(parts.masks), strict=True)
        ]
        persons = encode_masks(prediction.masks) if prediction.masks is not None else []
        return ParsingOutput(parts=labelled, persons=persons)
    if task == "classify":
        probs = prediction.probs if prediction.probs is not None else np.zeros(0, np.float32)
        best = np.argsort(-probs, kind="stable")[:TOP_CLASSES].tolist()
        return ClassifyOutput(top=[ClassScore(class_id=i, class_name=manifest.classes.get(i, str(i)),
                                              score=float(probs[i])) for i in best])
    return DetectOutput()


def _points(prediction: Prediction) -> list[list[Keypoint]]:
    if prediction.keypoints is None:
        return [[] for _ in range(len(prediction))]
    return [[Keypoint(x=x, y=y, visibility=v) for x, y, v in person] for person in prediction.keypoints.tolist()]


def prediction_of(result: JobResult) -> Prediction:
    """The arrays a result was made from (masks decoded; class names looked up by id are lost)."""
    detections = result.detections
    boxes = [(d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in detections]
    scores = [d.score for d in detections]
    class_ids = [d.class_id for d in detections]
    size = (result.image.height, result.image.width) if result.image is not None else (0, 0)
    extra: dict[str, Any] = {}
    match result.output:
        case SegmentOutput(masks=masks):
            extra["masks"] = decode_masks(masks, size)
        case PoseOutput(keypoints=points) | FaceOutput(landmarks=points) if any(points):
            extra["keypoints"] = np.asarray([[(p.x, p.y, p.visibility) for p in person] for person in points],
                                            dtype=np.float32)
        case ParsingOutput(parts=parts, persons=persons):
            extra["parts"] = Parts(np.asarray([p.class_id for p in parts], np.int64),
                                   np.asarray([p.score for p in parts], np.float32),
                                   decode_masks([p.mask for p in parts], size))
            if persons:
                extra["masks"] = decode_masks(persons, size)
        case ClassifyOutput(top=top):
            probs = np.zeros(max((c.class_id for c in top), default=-1) + 1, np.float32)
            for c in top:
                probs[c.class_id] = c.score
            extra["probs"] = probs
    return Prediction.of(boxes, scores, class_ids, **extra)


def names_of(result: JobResult) -> dict[int, str]:
    """The class names a result mentions, by id: what an evaluator of its predictions needs."""
    names = {d.class_id: d.class_name for d in result.detections}
    match result.output:
        case ParsingOutput(parts=parts):
            names.update((p.class_id, p.class_name) for p in parts)
        case ClassifyOutput(top=top):
            names.update((c.class_id, c.class_name) for c in top)
    return names


def score_results(task: str, cases: Iterable[tuple[Sequence[ExpectedObject], JobResult]],
                  thresholds: Thresholds | None = None) -> Score:
    """Recall over results against what each image holds, by the task's evaluator: the one
    validation and shadow runs use, for callers that hold wire results (the demo, tests)."""
    total = Score(0, 0)
    for expected, result in cases:
        size = (result.image.height, result.image.width) if result.image is not None else None
        evaluator = Evaluator(task, names_of(result), thresholds or Thresholds())
        total += evaluator.score(expected, prediction_of(result), size)
    return total
