"""One evaluator per task: recall against expectations, agreement between two versions."""

from typing import Any

import numpy as np
import pytest

from schemas.manifest import ExpectedObject
from worker.runtime.evaluation import Evaluator, Thresholds, oks
from worker.runtime.masks import encode_masks
from worker.runtime.predictions import Parts, Prediction

NAMES = {0: "circle", 1: "square"}


def square(x1: int, y1: int, x2: int, y2: int, shape: tuple[int, int] = (50, 50)) -> np.ndarray[Any, Any]:
    mask = np.zeros(shape, dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def test_detection_recall_needs_the_class_and_the_overlap() -> None:
    expected = [ExpectedObject(class_name="circle", box=(0, 0, 10, 10)),
                ExpectedObject(class_name="square", box=(20, 20, 30, 30))]
    found = Prediction.of([(1, 1, 10, 10), (20, 20, 30, 30), (40, 40, 45, 45)], [0.9, 0.9, 0.9], [0, 0, 1])
    score = Evaluator("detect", NAMES).score(expected, found)
    assert (score.found, score.expected) == (1, 2)  # the square is found as a circle: not found


def test_segment_recall_compares_masks_not_boxes() -> None:
    ring = square(0, 0, 20, 20) & ~square(5, 5, 15, 15)
    expected = [ExpectedObject(class_name="circle", box=(0, 0, 20, 20), mask=encode_masks(ring[None])[0])]
    same_box_full_mask = Prediction.of([(0, 0, 20, 20)], [0.9], [0], masks=square(0, 0, 20, 20)[None])
    right = Prediction.of([(0, 0, 20, 20)], [0.9], [0], masks=ring[None])
    evaluator = Evaluator("segment", NAMES, Thresholds(match_iou=0.8))
    assert evaluator.score(expected, same_box_full_mask).recall == 0.0  # IoU 300/400
    assert evaluator.score(expected, right).recall == 1.0
    assert evaluator.agreement(right, same_box_full_mask) == 0.0
    assert evaluator.agreement(right, right) == 1.0


def test_pose_recall_needs_the_keypoints_close() -> None:
    points = [(5.0, 5.0, 1.0), (15.0, 15.0, 1.0), (0.0, 0.0, 0.0)]  # the third is not labelled
    expected = [ExpectedObject(class_name="circle", box=(0, 0, 20, 20), keypoints=points)]
    near = np.array([[[5.5, 5, 1], [15, 14.5, 1], [99, 99, 1]]], np.float32)
    far = np.array([[[15, 15, 1], [5, 5, 1], [0, 0, 1]]], np.float32)
    evaluator = Evaluator("pose", NAMES)
    assert evaluator.score(expected, Prediction.of([(0, 0, 20, 20)], [1], [0], keypoints=near)).recall == 1.0
    assert evaluator.score(expected, Prediction.of([(0, 0, 20, 20)], [1], [0], keypoints=far)).recall == 0.0
    assert oks(np.array(points, np.float32), near[0], np.array([0, 0, 20, 20], np.float32)) > 0.9


def test_parsing_recall_is_per_part_by_mask() -> None:
    head, body = square(10, 0, 20, 10), square(5, 10, 25, 40)
    expected = [ExpectedObject(class_name="Face", mask=encode_masks(head[None])[0]),
                ExpectedObject(class_name="Torso", mask=encode_masks(body[None])[0])]
    names = {0: "Face", 1: "Torso"}
    parts = Parts(np.array([0, 1]), np.array([0.9, 0.9], np.float32), np.stack([head, square(30, 30, 50, 50)]))
    found = Prediction.of(parts=parts)
    evaluator = Evaluator("human-parsing", names)
    assert evaluator.score(expected, found).found == 1
    assert evaluator.agreement(found, Prediction.of()) == 0.0
    assert evaluator.agreement(Prediction.of(), Prediction.of()) == 1.0


def test_classify_recall_is_the_top_class() -> None:
    expected = [ExpectedObject(class_name="square")]
    evaluator = Evaluator("classify", NAMES)
    assert evaluator.score(expected, Prediction.of(probs=np.array([0.2, 0.8], np.float32))).recall == 1.0
    assert evaluator.score(expected, Prediction.of(probs=np.array([0.8, 0.2], np.float32))).recall == 0.0


@pytest.mark.parametrize("task", ["detect", "face-detection"])
def test_agreement_is_the_share_of_objects_both_find(task: str) -> None:
    a = Prediction.of([(0, 0, 10, 10), (20, 20, 30, 30)], [1, 1], [0, 0])
    b = Prediction.of([(0, 0, 10, 10)], [1], [0])
    evaluator = Evaluator(task, NAMES)
    assert evaluator.agreement(a, b) == 0.5 and evaluator.agreement(a, a) == 1.0
