"""Segment and pose through `UltralyticsBackend`: the zoo's real models, held to `YOLO.predict`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.jobs import InferenceParams
from schemas.manifest import ExpectedObject, Manifest
from worker.outputs import to_wire
from worker.runtime.backend import Image, ModelBackend, create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.masks import decode_masks, encode_masks
from worker.runtime.predictions import Prediction
from worker.runtime.repository import ModelRepository, sha256_of
from worker.runtime.validation import ValidationFailed, check_calibration

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)
SEGMENT, POSE = ("shapes-seg", "2.0.0"), ("shapes-pose", "1.0.0")
CONF = 0.05  # low, so that the comparison covers many objects, weak ones included


def _load(root: Path, name: str, version: str) -> ModelBackend:
    repository = ModelRepository(root)
    entry = repository.get(name, version)
    backend = create_backend("ultralytics", "cpu", task=entry.manifest.task)
    backend.load(repository.verified_artifact(entry), entry.manifest)
    backend.warm_up()
    return backend


@pytest.fixture(scope="module", params=[SEGMENT, POSE], ids=["segment", "pose"])
def served(request: pytest.FixtureRequest, task_zoo: Path) -> Iterator[tuple[ModelBackend, Path]]:
    name, version = request.param
    backend = _load(task_zoo, name, version)
    yield backend, task_zoo / name / version
    backend.release()


def _images(version_dir: Path, bus_jpg: Path) -> list[list[Image]]:
    """The calibration images as one batch, a photo alone, and a crop that is not square
    (ultralytics letterboxes a batch of mixed sizes differently from single images)."""
    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    assert manifest.calibration is not None
    batch = [decode_image((version_dir / i.file).read_bytes(), LIMITS) for i in manifest.calibration.images]
    photo = decode_image(bus_jpg.read_bytes(), LIMITS)
    return [batch, [photo], [np.ascontiguousarray(batch[0][10:110, :])]]


def _assert_same(ours: Prediction, theirs: Any, image: Image) -> None:
    boxes = theirs.boxes
    assert len(ours) == len(boxes)
    assert np.allclose(ours.boxes, boxes.xyxy.numpy(), atol=1e-3)
    assert np.allclose(ours.scores, boxes.conf.numpy(), atol=1e-3)
    assert np.array_equal(ours.class_ids, boxes.cls.numpy().astype(np.int64))
    if theirs.masks is not None or ours.masks is not None:
        assert ours.masks is not None and ours.masks.dtype == np.bool_
        assert ours.masks.shape == (len(ours), *image.shape[:2])  # the original image's pixels
        expected = theirs.masks.data.numpy() > 0.5 if theirs.masks is not None else ours.masks[:0]
        wired = decode_masks(encode_masks(ours.masks), image.shape[:2])
        assert np.array_equal(wired, expected)
    if theirs.keypoints is not None:
        assert ours.keypoints is not None and ours.keypoints.shape == (len(ours), 2, 3)
        assert np.allclose(ours.keypoints, theirs.keypoints.data.numpy(), atol=1e-3)


def test_predictions_equal_in_process_ultralytics(served: tuple[ModelBackend, Path], bus_jpg: Path,
                                                  reference: Callable[[Path], Any]) -> None:
    backend, version_dir = served
    yolo = reference(version_dir)
    compared = 0
    for batch in _images(version_dir, bus_jpg):
        ours = backend.predict(batch, InferenceParams(conf=CONF))
        theirs = yolo.predict(batch, imgsz=128, conf=CONF, verbose=False, retina_masks=True)
        for prediction, result, image in zip(ours, theirs, batch, strict=True):
            _assert_same(prediction, result, image)
            compared += len(prediction)
    assert compared > 20, "too few objects for the comparison to mean much"


def test_masks_and_keypoints_lie_on_the_photo(served: tuple[ModelBackend, Path], bus_jpg: Path) -> None:
    backend, _ = served
    photo = decode_image(bus_jpg.read_bytes(), LIMITS)
    (found,) = backend.predict([photo], InferenceParams(conf=0.01))
    height, width = photo.shape[:2]
    assert len(found), "a 0.01 threshold finds something on a real photo"
    assert found.boxes[:, 2].max() > 128, "boxes were not scaled back from the 128 px input"
    if found.masks is not None:
        assert found.masks.shape == (len(found), height, width)
    else:
        assert found.keypoints is not None
        assert (found.keypoints[..., 0] <= width).all() and (found.keypoints[..., 1] <= height).all()
        assert ((found.keypoints[..., 2] >= 0) & (found.keypoints[..., 2] <= 1)).all()


def test_good_versions_pass_their_calibration_and_a_bad_one_fails(task_zoo: Path) -> None:
    """Recall means something: the 2-epoch version is a real model that finds little, and fails."""
    recalls: dict[str, float | None] = {}
    for name in ("shapes-seg", "shapes-pose"):
        for version_dir in sorted((task_zoo / name).iterdir()):
            manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
            backend = _load(task_zoo, name, version_dir.name)
            try:
                recalls[f"{name}@{manifest.version}"] = check_calibration(backend, manifest, version_dir).recall
            except ValidationFailed as exc:
                assert "below the manifest's minimum" in str(exc) and "by mask IoU" in str(exc)
                recalls[f"{name}@{manifest.version}"] = None
            finally:
                backend.release()
    assert [key for key, recall in recalls.items() if recall is None] == ["shapes-seg@0.9.0-bad"], recalls
    assert recalls["shapes-seg@2.0.0"] >= recalls["shapes-seg@1.0.0"], recalls  # type: ignore[operator]


def _with_expected(manifest: Manifest, change: Callable[[ExpectedObject], ExpectedObject]) -> Manifest:
    assert manifest.calibration is not None
    images = [image.model_copy(update={"expected": [change(e) for e in image.expected]})
              for image in manifest.calibration.images]
    return manifest.model_copy(update={"calibration": manifest.calibration.model_copy(update={"images": images})})


def _shifted_mask(expected: ExpectedObject) -> ExpectedObject:
    """The same box, its mask moved off it: only a check of masks tells them apart."""
    assert expected.mask is not None
    mask = decode_masks([expected.mask], expected.mask.size)
    return expected.model_copy(update={"mask": encode_masks(np.roll(mask, 40, axis=2))[0]})


def _shifted_points(expected: ExpectedObject) -> ExpectedObject:
    assert expected.keypoints is not None and expected.box is not None
    width = expected.box[2] - expected.box[0]
    return expected.model_copy(update={"keypoints": [(x + width / 2, y, v) for x, y, v in expected.keypoints]})


@pytest.mark.parametrize(("model", "change", "reason"), [
    (SEGMENT, _shifted_mask, "by mask IoU ≥ 0.50"),
    (POSE, _shifted_points, "and keypoint OKS ≥ 0.50"),
], ids=["segment", "pose"])
def test_wrong_masks_or_keypoints_fail_calibration(task_zoo: Path, model: tuple[str, str],
                                                   change: Callable[[ExpectedObject], ExpectedObject],
                                                   reason: str) -> None:
    version_dir = task_zoo.joinpath(*model)
    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    backend = _load(task_zoo, *model)
    try:
        assert check_calibration(backend, manifest, version_dir).recall
        with pytest.raises(ValidationFailed, match=f"calibration recall 0.[0-2].*{reason}"):
            check_calibration(backend, _with_expected(manifest, change), version_dir)
    finally:
        backend.release()


def test_classify_answers_class_scores(tmp_path: Path) -> None:
    """No classify zoo: a randomly initialised YOLOv8n-cls, served through `YOLO.predict`."""
    import json

    import torch
    from safetensors.torch import save_file
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(0)
    network = ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)
    artifact = tmp_path / "model.safetensors"
    save_file({name: t.contiguous() for name, t in network.state_dict().items()}, artifact)
    manifest = Manifest(name="shapes-cls", version="0.1.0", backend="ultralytics", task="classify",
                        artifact=artifact.name, format="safetensors", architecture=json.loads(json.dumps(network.yaml)),
                        sha256=sha256_of(artifact), classes={0: "circle", 1: "square", 2: "triangle"},
                        input_size=64, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    backend = create_backend("ultralytics", "cpu", task="classify")
    backend.load(artifact, manifest)
    backend.warm_up()
    (found,) = backend.predict([np.full((80, 100, 3), 50, np.uint8)], InferenceParams())
    assert len(found) == 0 and found.probs is not None and found.probs.shape == (3,)
    assert abs(float(found.probs.sum()) - 1) < 1e-4
    detections, output = to_wire(found, manifest)
    assert detections == [] and output.task == "classify" and len(output.top) == 3


def test_detections_whose_mask_comes_out_empty_are_dropped_as_ultralytics_does() -> None:
    """Rare on real images (none on the zoo's), so crafted: a box too thin to hold a mask pixel."""
    from types import SimpleNamespace

    import torch
    from ultralytics.models.yolo.segment import SegmentationPredictor

    from worker.runtime.ultralytics_backend import _segmented

    generator = torch.Generator().manual_seed(0)
    proto = torch.randn(32, 32, 32, generator=generator)
    boxes = torch.tensor([[10.0, 10, 60, 70], [40.45, 40, 40.5, 90], [70, 20, 120, 50]])
    found = torch.cat([boxes, torch.tensor([[0.9, 0], [0.8, 1], [0.7, 2]]),
                       torch.randn(3, 32, generator=generator)], 1)
    original = np.zeros((200, 300, 3), np.uint8)
    predictor = SegmentationPredictor(overrides={"retina_masks": True})
    predictor.model = SimpleNamespace(names={0: "circle", 1: "square", 2: "triangle"})
    theirs = predictor.construct_result(found.clone(), torch.zeros(1, 3, 128, 128), original, "crafted", proto)
    ours = _segmented(found.numpy().copy(), (128, 128), original.shape, proto)
    assert len(ours) == len(theirs.boxes) == 2 and ours.masks is not None
    assert np.allclose(ours.boxes, theirs.boxes.xyxy.numpy(), atol=1e-3)
    assert np.array_equal(ours.masks, theirs.masks.data.numpy() > 0.5)
