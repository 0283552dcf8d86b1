"""The zoo's segment and pose families: labels from the generator, and the real build."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from control import zoo, zoo_tasks
from schemas.manifest import Manifest, Task
from worker.runtime.masks import decode_masks


def _shapes(n: int, seed: int = 0) -> list[zoo.Shape]:
    rng = np.random.default_rng(seed)
    return [shape for _ in range(n) for shape in zoo.make_shapes(rng)[1]]


def test_make_shapes_draws_what_make_shapes_image_draws() -> None:
    image, boxes = zoo.make_shapes_image(np.random.default_rng(11))
    same, shapes = zoo.make_shapes(np.random.default_rng(11))
    assert np.array_equal(image, same) and boxes == [s.box for s in shapes]


def test_masks_fill_their_boxes_exactly_and_are_what_was_drawn() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        image, shapes = zoo.make_shapes(rng)
        for shape in shapes:
            mask = zoo_tasks.shape_mask(shape)
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == shape.box[1:]
        # Outside every mask lies the background alone (plus noise).
        outside = ~np.any([zoo_tasks.shape_mask(s) for s in shapes], axis=0)
        assert image[outside].astype(float).std(0).max() < 20


@pytest.mark.parametrize("class_id", sorted(zoo.CLASSES))
def test_polygon_labels_outline_the_masks(class_id: int) -> None:
    for shape in [s for s in _shapes(60) if s.class_id == class_id]:
        mask = zoo_tasks.shape_mask(shape)
        fine = np.zeros((4 * 128, 4 * 128), np.uint8)  # rasterised finely, then averaged down
        cv2.fillPoly(fine, [np.round(zoo_tasks.shape_polygon(shape) * 4).astype(np.int32)], 1)
        outlined = cv2.resize(fine, (128, 128), interpolation=cv2.INTER_AREA) > 0.5
        assert (outlined & mask).sum() / (outlined | mask).sum() > 0.85


def test_keypoints_are_the_centroid_and_the_top() -> None:
    for shape in _shapes(40):
        (cx, cy, cv), (tx, ty, tv) = zoo_tasks.mask_keypoints(zoo_tasks.shape_mask(shape))
        _, x1, y1, x2, y2 = shape.box
        assert cv == tv == 1.0 and ty == y1 and x1 < tx < x2 and x1 < cx < x2 and y1 < cy < y2
        if shape.class_id != 2:  # circles and squares are symmetric about their box's centre
            assert (cx, cy, tx) == pytest.approx(((x1 + x2) / 2, (y1 + y2) / 2, (x1 + x2) / 2))


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_task_datasets_are_in_ultralytics_label_format(tmp_path: Path, task: Task) -> None:
    zoo_tasks.write_task_dataset(tmp_path, 4, seed=3, task=task)
    rng = np.random.default_rng(3)
    for i in range(4):
        image, shapes = zoo.make_shapes(rng)
        written = cv2.imread(str(tmp_path / f"images/{i:03d}.png"))
        assert written is not None and np.array_equal(written, image)
        rows = [line.split() for line in (tmp_path / f"labels/{i:03d}.txt").read_text().splitlines()]
        assert [int(row[0]) for row in rows] == [s.class_id for s in shapes]
        for row in rows:
            values = [float(v) for v in row[1:]]
            assert all(0 <= v <= 1 for v in values) if task == "segment" else len(values) == 4 + 3 * 2
            assert len(values) % 2 == 0 and len(values) >= 6


# --- the real build (the session's task zoo) ----------------------------------------------------


def _manifest(version_dir: Path) -> Manifest:
    return Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())


def test_built_versions_describe_their_task(task_zoo: Path) -> None:
    for family in zoo_tasks.FAMILIES:
        for recipe in family.recipes:
            version_dir = task_zoo / family.name / recipe.version
            manifest = _manifest(version_dir)
            assert zoo_tasks.is_built(version_dir, family, recipe) and manifest.task == family.task
            assert manifest.architecture is not None and manifest.calibration is not None
            assert set(manifest.lineage["metrics"]) >= {"box_mAP50", f"{family.task}_mAP50"}
            pose = family.task == "pose"
            assert manifest.keypoints == (list(zoo_tasks.KEYPOINTS) if pose else None)
            assert manifest.skeleton == (zoo_tasks.SKELETON if pose else None)
            assert manifest.architecture.get("kpt_shape") == ([2, 3] if pose else None)
            expected = [e for image in manifest.calibration.images for e in image.expected]
            assert len(expected) >= 15
            for item in expected:
                assert (item.mask is not None) != pose and (item.keypoints is not None) == pose
                if item.mask is not None:
                    mask = decode_masks([item.mask], (128, 128))[0]
                    ys, xs = np.nonzero(mask)
                    assert item.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_a_second_build_trains_nothing(task_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("a built version was trained again")

    monkeypatch.setattr(zoo_tasks, "_train_all", refuse)
    before = {d: _manifest(d).sha256 for d in zoo_tasks.build_tasks(task_zoo)}
    assert len(before) == sum(len(f.recipes) for f in zoo_tasks.FAMILIES)


def test_a_changed_recipe_makes_a_version_stale(task_zoo: Path) -> None:
    family = zoo_tasks.FAMILIES[0]
    recipe = family.recipes[0]
    version_dir = task_zoo / family.name / recipe.version
    assert zoo_tasks.is_built(version_dir, family, recipe)
    assert not zoo_tasks.is_built(version_dir, family, replace(recipe, epochs=recipe.epochs + 1))
    assert not zoo_tasks.is_built(version_dir, replace(family, task="pose"), recipe)
    assert not zoo_tasks.is_built(task_zoo / family.name / "missing", family, recipe)


@pytest.mark.slow
def test_the_build_is_deterministic(task_zoo: Path, tmp_path: Path) -> None:
    """Trained again from scratch, the cheapest version has the same weights, byte for byte."""
    family, recipe = min(((f, r) for f in zoo_tasks.FAMILIES for r in f.recipes), key=lambda fr: fr[1].epochs)
    (again,) = zoo_tasks.build_tasks(tmp_path, families=(replace(family, recipes=(recipe,)),))
    built = task_zoo / family.name / recipe.version
    assert _manifest(again).sha256 == _manifest(built).sha256
    assert (again / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()
