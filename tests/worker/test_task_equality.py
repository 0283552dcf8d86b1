"""Each backend and task through the pool equals the same model called in-process on the same image:
a job goes through the real broker and a real worker (in the test's event loop), its result is read
off the wire (masks decoded with pycocotools), and compared with ultralytics' `YOLO.predict`,
modelscope's `pipeline` or facenet-pytorch's `MTCNN`, built by the test from the version's files
(tests/conftest.py) without the worker's loading code. Boxes, scores and keypoints within 1e-3,
masks identical. Detection through the pool: tests/worker/test_job_path.py.

The large models, MogFace and M2FP, are compared here only (their load and calibration are most of
a test: ~33 s and ~37 s on this machine), and so run once each in the suite."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from control.client import Client
from schemas.jobs import InferenceParams, JobResult
from schemas.manifest import Manifest
from schemas.outputs import FaceOutput, ParsingOutput, PoseOutput, Rle, SegmentOutput
from worker.runtime.images import ImageLimits, decode_image

if TYPE_CHECKING:
    from conftest import BestFirst, ModelscopeReference, MtcnnReference, Reference, ServeInProcess

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = ImageLimits(max_bytes=10**8, max_pixels=10**8)
#: Low thresholds, so that the comparison covers many answers, weak ones included.
YOLO_PARAMS = InferenceParams(conf=0.05)
EVERY_FACE = InferenceParams(conf=0.0, max_det=1000)
ATOL = 1e-3


def _decoded(rles: list[Rle]) -> np.ndarray:
    """(n, height, width) booleans, by pycocotools itself."""
    if not rles:
        return np.zeros((0, 0, 0), np.bool_)
    decoded = coco_mask.decode([{"size": list(r.size), "counts": r.counts.encode("ascii")} for r in rles])
    return np.asarray(decoded).transpose(2, 0, 1).astype(np.bool_)


def _boxes(result: JobResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in result.detections], np.float32).reshape(-1, 4)
    scores = np.array([d.score for d in result.detections], np.float32)
    return boxes, scores, np.array([d.class_id for d in result.detections], np.int64)


def _points(rows: list[list[Any]]) -> np.ndarray:
    return np.array([[[p.x, p.y, p.visibility] for p in row] for row in rows], np.float32)


def _close(name: str, what: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, f"{name}: {what} {ours.shape} against {theirs.shape} in-process"
    worst = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    assert worst <= ATOL, f"{name}: {what} differ by up to {worst}"


def _assert_ok(result: JobResult, model: str, version: str) -> None:
    assert (result.status, result.model, result.version) == ("ok", model, version), result.error


def _same_as_yolo(result: JobResult, theirs: Any, name: str) -> int:
    """A segment or pose result against `YOLO.predict`'s, in its order (both run ultralytics' NMS)."""
    boxes, scores, classes = _boxes(result)
    _close(name, "boxes", boxes, theirs.boxes.xyxy.numpy())
    _close(name, "scores", scores, theirs.boxes.conf.numpy())
    assert classes.tolist() == theirs.boxes.cls.numpy().astype(int).tolist(), name
    if isinstance(result.output, SegmentOutput):
        expected = theirs.masks.data.numpy() > 0.5
        masks = _decoded(result.output.masks)
        assert masks.shape == expected.shape and np.array_equal(masks, expected), f"{name}: masks differ"
    else:
        assert isinstance(result.output, PoseOutput), result.output
        _close(name, "keypoints", _points(result.output.keypoints), theirs.keypoints.data.numpy())
    return len(boxes)


def _same_faces(result: JobResult, boxes: Any, scores: Any, landmarks: Any | None, name: str,
                best_first: BestFirst) -> int:
    """A face result against an in-process detector's faces, both put best first."""
    assert isinstance(result.output, FaceOutput), result.output
    theirs = best_first(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32).reshape(-1),
                        *([np.asarray(landmarks, np.float32).reshape(-1, 5, 2)] if landmarks is not None else []))
    ours_boxes, ours_scores, _ = _boxes(result)
    if landmarks is None:
        assert all(points == [] for points in result.output.landmarks), f"{name}: landmarks from nowhere"
        ours = best_first(ours_boxes, ours_scores)
    else:
        ours = best_first(ours_boxes, ours_scores, _points(result.output.landmarks)[:, :, :2])
    for what, a, b in zip(("boxes", "scores", "landmarks"), ours, theirs, strict=False):
        _close(name, what, a, b)
    return len(ours_boxes)


async def test_segment_pose_and_faces_through_the_pool_equal_in_process(
    task_zoo: Path, serve_in_process: ServeInProcess, client: Client, zoo: Path, bus_jpg: Path, tmp_path: Path,
    reference: Reference, modelscope_reference: ModelscopeReference, mtcnn_reference: MtcnnReference,
    best_first: BestFirst,
) -> None:
    segment, pose = task_zoo / "shapes-seg" / "2.0.0", task_zoo / "shapes-pose" / "1.0.0"
    shapes_image = _first_calibration_image(segment)
    zidane = bus_jpg.parent / "zidane.jpg"
    await serve_in_process("shapes-seg@2.0.0", "shapes-pose@1.0.0", "faces@1.0.0", "faces-mtcnn@1.0.0")
    seg, posed, ulfd, mtcnn = await asyncio.gather(
        client.submit(shapes_image, model="shapes-seg", params=YOLO_PARAMS),
        client.submit(shapes_image, model="shapes-pose", params=YOLO_PARAMS),
        client.submit(bus_jpg, model="faces", params=EVERY_FACE),
        client.submit(zidane, model="faces-mtcnn", params=EVERY_FACE),
    )
    for result, model in ((seg, "shapes-seg@2.0.0"), (posed, "shapes-pose@1.0.0"), (ulfd, "faces@1.0.0"),
                          (mtcnn, "faces-mtcnn@1.0.0")):
        _assert_ok(result, *model.split("@"))

    compared = {}
    for result, version_dir in ((seg, segment), (posed, pose)):
        (theirs,) = reference(version_dir).predict(str(shapes_image), imgsz=128, conf=YOLO_PARAMS.conf,
                                                   verbose=False, retina_masks=True)
        compared[version_dir.parent.name] = _same_as_yolo(result, theirs, version_dir.parent.name)

    pipeline = modelscope_reference(zoo / "faces" / "1.0.0", tmp_path)
    found = pipeline(decode_image(bus_jpg.read_bytes(), LIMITS))  # BGR, as the worker decodes it
    compared["faces"] = _same_faces(ulfd, found["boxes"], found["scores"], None, "faces", best_first)

    rgb = np.ascontiguousarray(decode_image(zidane.read_bytes(), LIMITS)[:, :, ::-1])
    boxes, probs, points = mtcnn_reference().detect(rgb, landmarks=True)
    compared["faces-mtcnn"] = _same_faces(mtcnn, boxes, probs, points, "faces-mtcnn", best_first)
    assert all(count > 0 for count in compared.values()), f"nothing to compare: {compared}"


@pytest.mark.slow
async def test_mogface_through_the_pool_equals_in_process(
    serve_in_process: ServeInProcess, client: Client, zoo: Path, tmp_path: Path,
    modelscope_reference: ModelscopeReference, best_first: BestFirst,
) -> None:
    mogface = zoo / "mogface" / "1.0.0"
    assert mogface.is_dir(), "the large zoo: hotswap zoo build --large"
    image = _first_calibration_image(mogface)
    await serve_in_process("mogface@1.0.0")
    faces = await client.submit(image, model="mogface", params=EVERY_FACE)
    _assert_ok(faces, "mogface", "1.0.0")
    found = modelscope_reference(mogface, tmp_path)(decode_image(image.read_bytes(), LIMITS))
    assert _same_faces(faces, found["boxes"], found["scores"], None, "mogface", best_first) > 0


@pytest.mark.slow
async def test_parsing_through_the_pool_equals_in_process(
    serve_in_process: ServeInProcess, client: Client, zoo: Path, tmp_path: Path,
    modelscope_reference: ModelscopeReference,
) -> None:
    parsing = zoo / "parsing" / "1.0.0"
    assert parsing.is_dir(), "the large zoo: hotswap zoo build --large"
    image = _first_calibration_image(parsing)
    await serve_in_process("parsing@1.0.0")
    parsed = await client.submit(image, model="parsing")
    _assert_ok(parsed, "parsing", "1.0.0")
    assert isinstance(parsed.output, ParsingOutput), parsed.output
    theirs = modelscope_reference(parsing, tmp_path)(decode_image(image.read_bytes(), LIMITS))
    expected = {label: np.asarray(mask) > 0.5 for label, mask in zip(theirs["labels"], theirs["masks"], strict=True)
                if label != "Background"}
    names = [part.class_name for part in parsed.output.parts]
    assert names and sorted(names) == sorted(expected)
    for name, mask in zip(names, _decoded([part.mask for part in parsed.output.parts]), strict=True):
        assert mask.shape == expected[name].shape and np.array_equal(mask, expected[name]), f"parsing: {name} differs"


def _first_calibration_image(version_dir: Path) -> Path:
    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    assert manifest.calibration is not None and manifest.calibration.images
    return version_dir / manifest.calibration.images[0].file
