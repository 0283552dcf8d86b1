"""`hotswap submit` output for people: a table per task, and every task drawn on its image."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from rich.console import Console

from control.annotate import annotated, draw_result, side_by_side
from control.render import print_result
from schemas.jobs import JobResult
from schemas.manifest import Manifest
from worker.outputs import to_wire
from worker.runtime.predictions import Parts, Prediction

H, W = 60, 80


def manifest(task: str, classes: dict[int, str], **fields: Any) -> Manifest:
    return Manifest(name="m", version="1.0.0", backend="trivial", task=task, artifact="a.json", format="json",
                    sha256="0" * 64, classes=classes, input_size=32, created_at=datetime(2026, 1, 1, tzinfo=UTC),
                    **fields)


def square_mask(x1: int, y1: int, x2: int, y2: int) -> np.ndarray[Any, Any]:
    mask = np.zeros((1, H, W), dtype=bool)
    mask[0, y1:y2, x1:x2] = True
    return mask


CASES: dict[str, tuple[Prediction, Manifest, str]] = {
    "segment": (Prediction.of([(10, 10, 30, 30)], [0.9], [0], masks=square_mask(10, 10, 30, 30)),
                manifest("segment", {0: "circle"}), "mask px"),
    "pose": (Prediction.of([(10, 10, 50, 50)], [0.8], [0],
                           keypoints=np.array([[[20, 20, 1.0], [40, 40, 0.9]]], np.float32)),
             manifest("pose", {0: "square"}, keypoints=["top", "centre"], skeleton=[(0, 1)]), "2/2: top, centre"),
    "face-detection": (Prediction.of([(5, 5, 40, 40)], [0.7], [0],
                                     keypoints=np.tile(np.array([[12, 15, 1]], np.float32), (1, 5, 1))),
                       manifest("face-detection", {0: "face"}), "(12,15)"),
    "human-parsing": (Prediction.of(parts=Parts(np.array([1]), np.array([0.6], np.float32),
                                                square_mask(0, 0, 40, 60))),
                      manifest("human-parsing", {0: "Human", 1: "Hair"}), "Hair"),
    "classify": (Prediction.of(probs=np.array([0.2, 0.8], np.float32)), manifest("classify", {0: "a", 1: "b"}),
                 "0.800"),
}


def result_for(task: str) -> JobResult:
    prediction, meta, _ = CASES[task]
    detections, output = to_wire(prediction, meta)
    return JobResult(job_id="j", status="ok", model="m", version="1.0.0", worker_id="w", detections=detections,
                     output=output, image={"width": W, "height": H})


@pytest.mark.parametrize("task", CASES)
def test_each_task_prints_what_it_adds(task: str) -> None:
    console = Console(record=True, width=200)
    print_result("img.png", result_for(task), console)
    text = console.export_text()
    assert task in text and CASES[task][2] in text, text


@pytest.mark.parametrize("task", ["segment", "pose", "face-detection", "human-parsing"])
def test_each_task_is_drawn_on_a_scaled_up_image(task: str, tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((H, W, 3), 128, np.uint8))
    blank = annotated(image, JobResult(job_id="j", status="ok", worker_id="w", image={"width": W, "height": H}))
    drawn = cv2.imread(str(draw_result(image, result_for(task), tmp_path)))
    assert drawn is not None
    assert drawn.shape[0] >= 480 and drawn.shape == blank.shape, "small images are drawn on at least 480 px"
    assert np.count_nonzero((drawn != blank).any(axis=2)) > 500, "nothing drawn"
    if task in ("segment", "human-parsing"):  # a tinted overlay, not only outlines
        inside = drawn[drawn.shape[0] // 4, drawn.shape[1] // 4 + 10]
        assert not (inside == 128).all(), inside


def test_side_by_side_puts_one_panel_per_model(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((H, W, 3), 128, np.uint8))
    out = cv2.imread(str(side_by_side(image, [result_for("segment"), result_for("pose")], tmp_path)))
    assert out is not None
    single = annotated(image, result_for("segment"))
    assert out.shape[1] == 2 * single.shape[1] and out.shape[0] == single.shape[0]


def test_long_answers_are_cut_with_a_count() -> None:
    many = Prediction.of([(i, i, i + 5, i + 5) for i in range(30)], [0.5] * 30, [0] * 30)
    detections, output = to_wire(many, manifest("detect", {0: "thing"}))
    console = Console(record=True, width=200)
    print_result("img.png", JobResult(job_id="j", status="ok", worker_id="w", detections=detections, output=output),
                 console)
    text = console.export_text()
    assert "… 18 more" in text and text.count("thing") == 12
