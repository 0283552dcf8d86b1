"""Arrays to the wire and back, for every task: what producers decode is what the model found."""

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from schemas.jobs import Detection, JobResult
from schemas.manifest import Manifest
from schemas.outputs import FaceOutput, ParsingOutput, PoseOutput, SegmentOutput
from worker.outputs import names_of, prediction_of, to_wire
from worker.runtime.predictions import Parts, Prediction

H, W = 40, 60


def manifest(task: str, **fields: Any) -> Manifest:
    return Manifest(name="m", version="1.0.0", backend="trivial", task=task, artifact="a.json", format="json",
                    sha256="0" * 64, classes=fields.pop("classes", {0: "circle", 1: "square"}), input_size=32,
                    created_at=datetime(2026, 1, 1, tzinfo=UTC), **fields)


def masks(*boxes: tuple[int, int, int, int]) -> np.ndarray[Any, Any]:
    out = np.zeros((len(boxes), H, W), dtype=bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        out[i, y1:y2, x1:x2] = True
    out[0, 5, 5] = True  # not a rectangle: run lengths with holes
    return out


def result(prediction: Prediction, meta: Manifest) -> JobResult:
    detections, output = to_wire(prediction, meta)
    wire = JobResult(job_id="j", status="ok", worker_id="w", detections=detections, output=output,
                     image={"width": W, "height": H})
    return JobResult.model_validate_json(wire.model_dump_json())  # as a producer reads it


def test_a_segment_result_carries_one_rle_per_detection_that_any_decoder_reads() -> None:
    instance = masks((10, 10, 20, 30), (30, 0, 60, 40))
    found = Prediction.of([(10, 10, 20, 30), (30, 0, 60, 40)], [0.9, 0.8], [0, 1], masks=instance)
    back = result(found, manifest("segment"))
    assert isinstance(back.output, SegmentOutput) and len(back.output.masks) == 2
    raw = coco_mask.decode([{"size": list(r.size), "counts": r.counts} for r in back.output.masks])
    assert (raw.transpose(2, 0, 1).astype(bool) == instance).all()
    decoded = prediction_of(back).masks
    assert decoded is not None and (decoded == instance).all()


def test_pose_and_face_results_name_their_points() -> None:
    points = np.array([[[1, 2, 0.9], [3, 4, 0.1]]], dtype=np.float32)
    pose = result(Prediction.of([(0, 0, 9, 9)], [0.5], [0], keypoints=points),
                  manifest("pose", keypoints=["top", "centre"], skeleton=[(0, 1)]))
    assert isinstance(pose.output, PoseOutput)
    assert (pose.output.keypoint_names, pose.output.skeleton) == (["top", "centre"], [(0, 1)])
    assert np.allclose(prediction_of(pose).keypoints, points)  # type: ignore[arg-type]
    faces = result(Prediction.of([(0, 0, 9, 9)], [0.5], [0]), manifest("face-detection", classes={0: "face"}))
    assert isinstance(faces.output, FaceOutput) and faces.output.landmarks == [[]]
    assert faces.output.landmark_names[0] == "left_eye"


def test_a_parsing_result_has_labelled_parts_and_persons() -> None:
    parts = Parts(np.array([1, 0]), np.array([0.7, 0.6], np.float32), masks((0, 0, 10, 10), (10, 10, 30, 30)))
    person = masks((0, 0, 30, 30))
    found = Prediction.of([(0, 0, 30, 30)], [1.0], [0], masks=person, parts=parts)
    back = result(found, manifest("human-parsing", classes={0: "Human", 1: "Face"}))
    assert isinstance(back.output, ParsingOutput)
    assert [p.class_name for p in back.output.parts] == ["Face", "Human"] and len(back.output.persons) == 1
    again = prediction_of(back)
    assert again.parts is not None and (again.parts.masks == parts.masks).all()
    assert names_of(back) == {0: "Human", 1: "Face"}


def test_a_classifier_answers_its_top_classes() -> None:
    back = result(Prediction.of(probs=np.array([0.1, 0.7, 0.2], np.float32)),
                  manifest("classify", classes={0: "a", 1: "b", 2: "c"}))
    assert back.output is not None and back.task == "classify" and not back.detections
    assert [c.class_name for c in back.output.top] == ["b", "c", "a"]  # type: ignore[union-attr]


def test_a_detect_result_keeps_its_shape_and_names_its_task() -> None:
    back = result(Prediction.of([(1, 2, 3, 4)], [0.5], [1]), manifest("detect"))
    assert back.task == "detect" and back.detections[0].class_name == "square"
    assert set(back.model_dump()) >= {"detections", "output"}


def test_masks_that_do_not_match_the_detections_are_refused() -> None:
    detections, output = to_wire(Prediction.of([(0, 0, 5, 5)], [0.5], [0], masks=masks((0, 0, 5, 5))),
                                 manifest("segment"))
    extra = Detection(class_id=0, class_name="x", score=1.0, box=detections[0].box)
    with pytest.raises(ValueError, match="segment output has 1 entries for 2 detections"):
        JobResult(job_id="j", status="ok", worker_id="w", detections=[*detections, extra], output=output)
