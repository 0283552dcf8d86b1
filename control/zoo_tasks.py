"""The zoo's segment and pose families: YOLOv8n-seg and YOLOv8n-pose trained on the shapes set.

Same generator, seeds and training settings as the detect family (`control.zoo`); the labels come
from what the generator drew (`make_shapes`): each shape redrawn alone is its exact mask, its
outline is the polygon ultralytics trains on, and two keypoints are read off the mask ("centre",
its centroid; "top", the middle of its top-most row) — points a tiny network learns in a minute
because they follow from the box and the shape's kind. Written as `<root>/shapes-seg/<version>/`
and `<root>/shapes-pose/<version>/`, calibration expectations (masks as RLE, keypoints) taken
from held-out images of the detect family's held-out seed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from control import zoo
from control.zoo import Progress, Recipe, Shape
from schemas.manifest import Calibration, CalibrationImage, ExpectedObject, Manifest, Task
from worker.runtime.repository import sha256_of

#: Bump when the labels derived from a shape (polygon, mask, keypoints) change.
LABELS = 1
KEYPOINTS: tuple[str, ...] = ("centre", "top")
SKELETON: list[tuple[int, int]] = [(0, 1)]
# A horizontal flip keeps both points what they are.
POSE_DATA: dict[str, Any] = {"kpt_shape": [len(KEYPOINTS), 3], "flip_idx": [0, 1]}
CIRCLE_VERTICES = 10  # degrees between a circle's outline vertices


@dataclass(frozen=True)
class Family:
    name: str
    task: Task
    config: str  # the packaged ultralytics config training starts from
    recipes: tuple[Recipe, ...]
    min_recall: float
    conf: float = 0.25  # the calibration's score threshold


# Each run kept under about two minutes on two CPU cores. Calibration recall as built (ultralytics
# 8.4.190, torch 2.14): shapes-seg by mask IoU >= 0.5 at conf 0.1 (at 0.25): 1.0.0 0.50 (0.23),
# 2.0.0 0.82 (0.73), 0.9.0-bad 0.05 (0.00); shapes-pose by box IoU and OKS >= 0.5 at 0.25: 0.64.
# Training is deterministic on one machine, not across CPUs: built on an AMD EPYC (2026-12-07)
# shapes-seg 1.0.0 found 0.36 (8 of 22) at 0.1, 2.0.0 0.86, 0.9.0-bad 0.00. Its minimum of 0.25
# keeps the bad version out and the good ones in on both.
FAMILIES: tuple[Family, ...] = (
    Family("shapes-seg", "segment", "yolov8n-seg.yaml", (
        Recipe("1.0.0", None, epochs=10, optimizer="AdamW", lr0=0.004, warmup_epochs=1.0),
        Recipe("2.0.0", "1.0.0", epochs=16, optimizer="AdamW", lr0=0.004, warmup_epochs=1.0),
        # Stops right after warm-up: a real model that segments next to nothing.
        Recipe("0.9.0-bad", "2.0.0", epochs=2, optimizer="AdamW", lr0=0.004, warmup_epochs=1.0),
    ), min_recall=0.25, conf=0.1),
    Family("shapes-pose", "pose", "yolov8n-pose.yaml", (
        Recipe("1.0.0", None, epochs=14, optimizer="AdamW", lr0=0.004, warmup_epochs=1.0),
    ), min_recall=0.5),
)
#: Validating after the last epoch only saves a fifth of the time; what is served is then the last
#: epoch's weights (ultralytics' "best" is the last one validated).
TRAIN_ARGS: dict[str, Any] = {**zoo.TRAIN_ARGS, "val": False}


@dataclass(frozen=True)
class TaskTrained:
    weights: str
    metrics: dict[str, float]
    architecture: dict[str, Any]
    seconds: float


# --- labels from what was drawn ----------------------------------------------------------------


def shape_mask(shape: Shape, size: int = zoo.IMAGE_SIZE) -> np.ndarray:
    """The pixels the generator filled for `shape`, as (size, size) booleans."""
    canvas = np.zeros((size, size), np.uint8)
    zoo.draw_shape(canvas, shape, (1,))
    return canvas.astype(bool)


def shape_polygon(shape: Shape) -> np.ndarray:
    """The shape's outline in pixel-edge coordinates, (m, 2) floats: what ultralytics rasterises."""
    if shape.class_id == 1:
        _, x1, y1, x2, y2 = shape.box
        return np.array([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], np.float64)
    if shape.class_id == 0:
        outline = cv2.ellipse2Poly(shape.centre, (shape.half, shape.half), 0, 0, 360, CIRCLE_VERTICES)
        return np.asarray(outline, np.float64)[:-1] + 0.5  # vertices at pixel centres; the last repeats the first
    return np.array(shape.corners, np.float64) + 0.5


def mask_keypoints(mask: np.ndarray) -> list[tuple[float, float, float]]:
    """The mask's "centre" (centroid) and "top" (middle of its top row), in pixel-edge coordinates,
    both visible (1)."""
    ys, xs = np.nonzero(mask)
    top = ys.min()
    centre = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, 1.0)
    return [centre, (float(xs[ys == top].mean()) + 0.5, float(top), 1.0)]


def _label_line(task: Task, shape: Shape, size: int) -> str:
    class_id, x1, y1, x2, y2 = shape.box
    if task == "segment":
        values = (shape_polygon(shape) / size).reshape(-1).tolist()
    else:
        values = [(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size]
        for x, y, _ in mask_keypoints(shape_mask(shape, size)):
            values += [x / size, y / size, 2]  # ultralytics: 2 = labelled and visible
    return f"{class_id} " + " ".join(f"{v:.6f}" for v in values) + "\n"


def write_task_dataset(directory: Path, n: int, seed: int, task: Task, size: int = zoo.IMAGE_SIZE) -> None:
    """`images/NNN.png` and ultralytics labels (polygons for segment, box + keypoints for pose)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, shapes = zoo.make_shapes(rng, size)
        cv2.imwrite(str(directory / f"images/{i:03d}.png"), image)
        (directory / f"labels/{i:03d}.txt").write_text("".join(_label_line(task, s, size) for s in shapes))


def expected_objects(task: Task, shapes: list[Shape], size: int = zoo.IMAGE_SIZE) -> list[ExpectedObject]:
    """What a calibration image holds, as the task's evaluator compares it."""
    from worker.runtime.masks import encode_masks

    expected = []
    for shape in shapes:
        mask = shape_mask(shape, size)
        box = tuple(float(v) for v in shape.box[1:])
        extra: dict[str, Any] = {"mask": encode_masks(mask[None])[0]} if task == "segment" else {
            "keypoints": mask_keypoints(mask)}
        expected.append(ExpectedObject(class_name=zoo.CLASSES[shape.class_id], box=box, **extra))
    return expected


# --- training (in a child process) ------------------------------------------------------------


def _train(family: Family, recipe: Recipe, data_yaml: str, project: str) -> TaskTrained:
    """Train one recipe of a family; its weights as safetensors, its validation metrics."""
    import time

    from ultralytics import YOLO

    started = time.monotonic()
    model = YOLO(family.config, task=family.task)  # packaged: builds a fresh network, fetches nothing
    metrics = model.train(
        data=data_yaml, imgsz=zoo.IMAGE_SIZE, epochs=recipe.epochs, optimizer=recipe.optimizer,
        lr0=recipe.lr0, warmup_epochs=recipe.warmup_epochs, pretrained=False, amp=False,
        plots=False, seed=0, workers=0, deterministic=True, device="cpu", verbose=False,
        project=project, name=f"{family.name}-{recipe.version}", exist_ok=True, **TRAIN_ARGS,
    )  # fmt: skip
    trainer = model.trainer
    assert trainer is not None and metrics is not None
    weights = Path(trainer.save_dir) / zoo.ARTIFACT
    architecture = zoo._export(model.model, weights, family.task)
    second = metrics.seg if family.task == "segment" else metrics.pose
    found = {"box_mAP50": float(metrics.box.map50), "box_mAP50-95": float(metrics.box.map),
             f"{family.task}_mAP50": float(second.map50), f"{family.task}_mAP50-95": float(second.map)}
    return TaskTrained(str(weights), found, architecture, time.monotonic() - started)


# --- zoo ----------------------------------------------------------------------------------------


def lineage(family: Family, recipe: Recipe) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(recipe).items() if k not in ("version", "parent")}
    dataset = {"generator": zoo.GENERATOR, "labels": LABELS, "seed": zoo.DATA_SEED, "train": zoo.N_TRAIN,
               "val": zoo.N_VAL}
    return {"parent": recipe.parent, "dataset": dataset,
            "recipe": {"model": family.config, "imgsz": zoo.IMAGE_SIZE, **settings, **TRAIN_ARGS}}


def is_built(version_dir: Path, family: Family, recipe: Recipe) -> bool:
    """The manifest parses, pins the artifact beside it and was built from this recipe and data."""
    try:
        manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
        expected = lineage(family, recipe)
        if manifest.task != family.task or any(manifest.lineage.get(k) != expected[k] for k in ("dataset", "recipe")):
            return False
        return sha256_of(version_dir / manifest.artifact) == manifest.sha256
    except (OSError, ValueError):
        return False


def write_version(family: Family, recipe: Recipe, trained: TaskTrained, final: Path) -> None:
    tmp = zoo._scratch(final.parent, f".tmp-{recipe.version}-")
    shutil.copyfile(trained.weights, tmp / zoo.ARTIFACT)
    (tmp / "calibration").mkdir()
    rng = np.random.default_rng(zoo.HELDOUT_SEED)  # the detect family's held-out images, first ones
    images = []
    for i in range(zoo.N_CALIBRATION):
        image, shapes = zoo.make_shapes(rng)
        name = f"calibration/{i:03d}.png"
        cv2.imwrite(str(tmp / name), image)
        images.append(CalibrationImage(file=name, expected=expected_objects(family.task, shapes)))
    pose = family.task == "pose"
    manifest = Manifest(
        name=family.name, version=recipe.version, backend="ultralytics", task=family.task,
        artifact=zoo.ARTIFACT, format=zoo.ARTIFACT_FORMAT, architecture=trained.architecture,
        sha256=sha256_of(tmp / zoo.ARTIFACT), classes=zoo.CLASSES, input_size=zoo.IMAGE_SIZE,
        keypoints=list(KEYPOINTS) if pose else None, skeleton=SKELETON if pose else None,
        created_at=zoo.CREATED_AT,
        calibration=Calibration(images=images, min_recall=family.min_recall, match_iou=0.5, min_oks=0.5,
                                conf=family.conf),
        lineage={**lineage(family, recipe), "metrics": {k: round(v, 4) for k, v in trained.metrics.items()}},
    )  # fmt: skip
    (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    zoo._publish(tmp, final)


def _data_yaml(work: Path, family: Family) -> Path:
    for split, n, seed in (("train", zoo.N_TRAIN, zoo.DATA_SEED), ("val", zoo.N_VAL, zoo.DATA_SEED + 1)):
        write_task_dataset(work / family.name / split, n, seed, family.task)
    spec = {"path": str(work / family.name), "train": "train/images", "val": "val/images",
            "names": {str(k): v for k, v in zoo.CLASSES.items()}, **(POSE_DATA if family.task == "pose" else {})}
    data_yaml = work / f"{family.name}.yaml"
    data_yaml.write_text(json.dumps(spec))  # JSON is YAML
    return data_yaml


def _sweep(root: Path) -> None:
    # Leftovers of a builder killed mid-way; safe to remove because we hold the lock.
    for family in FAMILIES:
        for leftover in [*root.glob(f"{family.name}/.tmp-*"), *root.glob(f"{family.name}/.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".work-tasks/*"):
        shutil.rmtree(leftover, ignore_errors=True)


def build_tasks(root: Path, *, force: bool = False, progress: Progress | None = None,
                families: tuple[Family, ...] = FAMILIES) -> list[Path]:
    """Build every missing segment and pose version (all with `force`); returns their directories."""
    say = progress or (lambda _message: None)
    root = root.resolve()
    plan = [(f, r, root / f.name / r.version) for f in families for r in f.recipes]
    # Not the detect family's lock: build_zoo trains both side by side.
    with zoo._locked(root / ".tasks"):
        _sweep(root)
        todo = [(f, r, d) for f, r, d in plan if force or not is_built(d, f, r)]
        if todo:
            (root / ".work-tasks").mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root / ".work-tasks") as work_name:
                _train_all(root, Path(work_name), todo, say)
    return [d for _, _, d in plan]


def _train_all(root: Path, work: Path, todo: list[tuple[Family, Recipe, Path]], say: Progress) -> None:
    data: dict[str, Path] = {}
    # Spawned, as for the detect family: ultralytics flips process-wide torch state.
    context, init = get_context("spawn"), (zoo.offline_env(root),)
    with ProcessPoolExecutor(1, mp_context=context, initializer=zoo._child_init, initargs=init) as pool:
        for family, recipe, final in todo:
            if family.name not in data:
                data[family.name] = _data_yaml(work, family)
            say(f"training {family.name} {recipe.version} ({recipe.epochs} epochs)")
            trained = pool.submit(_train, family, recipe, str(data[family.name]), str(work / "runs")).result()
            write_version(family, recipe, trained, final)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in trained.metrics.items())
            say(f"built {final} in {trained.seconds:.0f} s ({shown})")
