"""Demo model zoo: real YOLOv8n shape detectors trained from scratch, offline, on synthetic data.

Nothing can download weights here, so the zoo is built: a seeded shapes data set (circles,
squares, triangles on noisy backgrounds) and three training recipes of different quality,
written as `<root>/shapes/<version>/` (model.safetensors, manifest.json, calibration/) plus a
held-out set in `<root>/_data/shapes-heldout/`.

What a version serves is data, not code: the trained network's state dict as safetensors, and
its architecture (the model's yaml dict) in the manifest. ultralytics' own checkpoint, a pickle,
stays behind in the build's scratch directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from schemas.manifest import ArtifactFormat, Calibration, CalibrationImage, ExpectedBox, Manifest, Task
from worker.runtime.repository import sha256_of

CLASSES: dict[int, str] = {0: "circle", 1: "square", 2: "triangle"}
IMAGE_SIZE = 128
MODEL_NAME = "shapes"
ARTIFACT = "model.safetensors"
# Versions whose manifest names another format (or predates formats) count as stale.
ARTIFACT_FORMAT: ArtifactFormat = "safetensors"
# Fixed so that rebuilding gives identical manifests apart from the weights' hash.
CREATED_AT = datetime(2026, 1, 1, tzinfo=UTC)
GENERATOR = 2  # bump when make_shapes_image changes: built versions then count as stale
DATA_SEED, N_TRAIN, N_VAL = 0, 256, 64
HELDOUT_SEED, N_HELDOUT, N_CALIBRATION = 1000, 40, 8
#: The detect line and the task lines train at the same time (`build_zoo`).
TRAININGS_AT_ONCE = 2
# ultralytics accumulates gradients up to a nominal batch of 64 and warms up for at least 100
# steps: on 256 images that left 1.0.0 too few real steps to pass its calibration. Mosaic
# quarters 128 px images, shrinking the shapes (2.0.0: 0.46 with it, 0.99 without).
TRAIN_ARGS: dict[str, Any] = {"batch": 8, "nbs": 8, "mosaic": 0.0}

Box = tuple[int, int, int, int, int]  # class_id, x1, y1, x2, y2 (pixel edges, x2/y2 exclusive)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Trained:
    """What a training child hands back: the weights file, its quality, the network's config."""

    weights: str
    map50: float
    architecture: dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    version: str
    parent: str | None
    epochs: int
    optimizer: str = "auto"  # ultralytics' default: AdamW with an lr fitted to the class count
    lr0: float = 0.01
    warmup_epochs: float = 3.0


# Tuned for the ultralytics release pyproject.toml pins: the same recipe trains differently across
# releases (1.0.0's 10 epochs gave mAP50 0.92 with an earlier one, 0.43 with 8.4.190).
RECIPES: tuple[Recipe, ...] = (
    Recipe("1.0.0", None, epochs=15, optimizer="AdamW", lr0=0.004, warmup_epochs=1.0),
    Recipe("2.0.0", "1.0.0", epochs=20),
    # Stops right after warm-up: a real model that detects next to nothing (5 epochs: mAP50 0.16).
    Recipe("0.9.0-bad", "2.0.0", epochs=4),
)


# --- data set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One shape as the generator drew it: enough to draw it again alone (its exact mask)."""

    class_id: int
    box: Box
    centre: tuple[int, int]
    half: int
    corners: tuple[tuple[int, int], ...] = ()  # a triangle's vertices, as filled


def make_shapes_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Box]]:
    """One noisy BGR image with 1-4 non-overlapping filled shapes and their exact boxes."""
    image, shapes = make_shapes(rng, size)
    return image, [shape.box for shape in shapes]


def make_shapes(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Shape]]:
    """`make_shapes_image` with what it drew; the same random draws, so the same images and boxes."""
    background = rng.integers(0, 256, 3)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):
            class_id = int(rng.integers(0, 3))
            half = int(rng.integers(size // 8, size // 4))
            cx, cy = (int(v) for v in rng.integers(half + 1, size - half - 1, 2))
            box = (class_id, cx - half, cy - half, cx + half + 1, cy + half + 1)
            if not any(_overlap(box, other.box) for other in shapes):
                break
        else:
            continue  # crowded image: fewer shapes rather than overlapping labels
        colour = _contrasting(rng, background)
        shape = Shape(class_id, box, (cx, cy), half)
        if class_id == 2:
            angle = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
            pts = np.stack([cx + half * np.cos(angle), cy + half * np.sin(angle)], 1).round().astype(np.int32)
            (x1, y1), (x2, y2) = pts.min(0), pts.max(0) + 1
            corners = tuple((int(x), int(y)) for x, y in pts)
            shape = Shape(class_id, (class_id, int(x1), int(y1), int(x2), int(y2)), (cx, cy), half, corners)
        draw_shape(image, shape, colour)
        shapes.append(shape)
    noise = rng.normal(0, 12, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), shapes


def draw_shape(canvas: np.ndarray, shape: Shape, colour: tuple[int, ...]) -> None:
    """Fill `shape` into `canvas`; on a blank single-channel canvas that is its mask."""
    (cx, cy), half = shape.centre, shape.half
    if shape.class_id == 0:
        cv2.circle(canvas, (cx, cy), half, colour, -1, cv2.LINE_8)
    elif shape.class_id == 1:
        cv2.rectangle(canvas, (cx - half, cy - half), (cx + half, cy + half), colour, -1)
    else:
        cv2.fillPoly(canvas, [np.array(shape.corners, np.int32)], colour, cv2.LINE_8)


def _overlap(a: Box, b: Box) -> bool:
    return a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    # A shape barely distinguishable from its background would make labels a lottery.
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() > 150:
            return (int(colour[0]), int(colour[1]), int(colour[2]))


def write_dataset(
    directory: Path, n: int, seed: int, size: int = IMAGE_SIZE, *, yolo_labels: bool = True
) -> list[dict[str, Any]]:
    """Write `images/NNN.png`, `labels.json` (pixel boxes) and, for training, YOLO `labels/NNN.txt`."""
    rng = np.random.default_rng(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    if yolo_labels:
        (directory / "labels").mkdir(exist_ok=True)
    records: list[dict[str, Any]] = []
    for i in range(n):
        image, boxes = make_shapes_image(rng, size)
        cv2.imwrite(str(directory / f"images/{i:03d}.png"), image)
        if yolo_labels:
            xywh = [(c, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1) for c, x1, y1, x2, y2 in boxes]
            lines = "".join(
                f"{c} {x / size:.6f} {y / size:.6f} {w / size:.6f} {h / size:.6f}\n" for c, x, y, w, h in xywh
            )
            (directory / f"labels/{i:03d}.txt").write_text(lines)
        labelled = [{"class_id": b[0], "class_name": CLASSES[b[0]], "box": list(b[1:])} for b in boxes]
        records.append({"file": f"images/{i:03d}.png", "width": size, "height": size, "boxes": labelled})
    (directory / "labels.json").write_text(json.dumps(records, indent=1))
    return records


# --- training (in a child process) ------------------------------------------------------------


def offline_env(root: Path) -> dict[str, str]:
    """Environment that keeps ultralytics off the network; set it before importing ultralytics."""
    return {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(_config_dir(root))}


def _config_dir(root: Path) -> Path:
    # check_det_dataset() fetches Arial.ttf even with plots=False unless the config dir has one.
    config = root.resolve() / ".ultralytics"
    font = config / "Arial.ttf"
    if not font.exists():
        config.mkdir(parents=True, exist_ok=True)
        partial = config / f".Arial.ttf.{os.getpid()}"  # readers elsewhere never see half a font
        shutil.copyfile(_any_font(), partial)
        os.replace(partial, font)
    return config


def _any_font() -> Path:
    try:
        import matplotlib

        return Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"
    except ImportError:
        fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf"))
        if not fonts:
            raise FileNotFoundError("no .ttf font to stand in for Arial.ttf") from None
        return fonts[0]


def _child_init(env: dict[str, str]) -> None:
    os.environ.update(env)
    from ultralytics.utils import torch_utils

    # ultralytics sets torch's thread count when training picks its device, to cpu_count - 1 (at
    # most 8), whatever was set before: its share of the cores instead, as trainings run side by side.
    torch_utils.NUM_THREADS = max(1, min(8, (os.cpu_count() or 1) // TRAININGS_AT_ONCE))


def _train(recipe: Recipe, data_yaml: str, project: str) -> Trained:
    """Train one recipe; returns its weights as safetensors and its mAP50 on the validation split."""
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")  # a packaged config: builds a fresh network, fetches nothing
    metrics = model.train(
        data=data_yaml, imgsz=IMAGE_SIZE, epochs=recipe.epochs, optimizer=recipe.optimizer,
        lr0=recipe.lr0, warmup_epochs=recipe.warmup_epochs, pretrained=False, amp=False,
        plots=False, seed=0, workers=0, deterministic=True, device="cpu", verbose=False,
        project=project, name=recipe.version, exist_ok=True, **TRAIN_ARGS,
    )  # fmt: skip
    trainer = model.trainer
    assert trainer is not None and metrics is not None
    # After training, model.model is the best checkpoint's network (ultralytics reloads it, in float).
    weights = Path(trainer.save_dir) / ARTIFACT
    architecture = _export(model.model, weights)
    return Trained(str(weights), float(metrics.box.map50), architecture)


def _export(network: Any, weights: Path, task: Task = "detect") -> dict[str, Any]:
    """Write `network`'s state dict as safetensors; returns its architecture, checked to rebuild it."""
    import torch
    from safetensors.torch import save_file

    from worker.runtime.ultralytics_networks import build_network
    from worker.runtime.weights import ArtifactLoader

    save_file({name: t.contiguous() for name, t in network.state_dict().items()}, weights)
    architecture: dict[str, Any] = json.loads(json.dumps(network.yaml))  # as the manifest will hold it
    # What the worker will build from these two must compute what training produced.
    rebuilt = build_network(architecture, task)
    rebuilt.load_state_dict(ArtifactLoader().tensors(weights, _probe_manifest(architecture, task)), strict=True)
    probe = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = _tensors(rebuilt.eval()(probe)[0]), _tensors(network.eval()(probe)[0])
        if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(ours, theirs, strict=True)):
            raise RuntimeError("the exported weights and architecture do not rebuild the trained network")
    return architecture


def _tensors(output: Any) -> list[Any]:
    # A segment head's predictions come with its mask prototypes: (predictions, prototypes).
    return list(output) if isinstance(output, tuple | list) else [output]


def _probe_manifest(architecture: dict[str, Any], task: Task = "detect") -> Manifest:
    return Manifest(name=MODEL_NAME, version="0", backend="ultralytics", task=task, artifact=ARTIFACT,
                    format=ARTIFACT_FORMAT, architecture=architecture, sha256="0" * 64, classes=CLASSES,
                    input_size=IMAGE_SIZE, created_at=CREATED_AT)


# --- zoo ----------------------------------------------------------------------------------------


def is_complete(version_dir: Path, recipe: Recipe | None = None) -> bool:
    """Built = the manifest parses, pins the artifact beside it and (given) matches the recipe."""
    try:
        manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
        if manifest.format != ARTIFACT_FORMAT:
            return False
        if recipe is not None:
            expected = _lineage(recipe)
            if any(manifest.lineage.get(key) != expected[key] for key in ("dataset", "recipe")):
                return False
        return sha256_of(version_dir / manifest.artifact) == manifest.sha256
    except (OSError, ValueError):
        return False


def _lineage(recipe: Recipe) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(recipe).items() if k not in ("version", "parent")}
    return {
        "parent": recipe.parent,
        "dataset": {"generator": GENERATOR, "seed": DATA_SEED, "train": N_TRAIN, "val": N_VAL},
        "recipe": {"model": "yolov8n.yaml", "imgsz": IMAGE_SIZE, **settings, **TRAIN_ARGS},
    }


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".zoo.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds everything built
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _scratch(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; workers may run as another user
    return tmp


def _sweep(root: Path) -> None:
    # Leftovers of a builder killed mid-way; safe to remove because we hold the lock.
    for pattern in (f"{MODEL_NAME}/.tmp-*", f"{MODEL_NAME}/.old-*", "_data/.tmp-*", "_data/.old-*", ".work/*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the stale one aside first.
    if final.exists():
        stale = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)


def _build_heldout(root: Path) -> Path:
    final = root / "_data" / "shapes-heldout"
    spec = {"generator": GENERATOR, "seed": HELDOUT_SEED, "n": N_HELDOUT, "size": IMAGE_SIZE}
    try:
        if json.loads((final / "dataset.json").read_text()) == spec:
            return final
    except (OSError, ValueError):
        pass
    tmp = _scratch(final.parent, ".tmp-heldout-")
    write_dataset(tmp, N_HELDOUT, HELDOUT_SEED, yolo_labels=False)
    (tmp / "dataset.json").write_text(json.dumps(spec) + "\n")  # written last: marks it complete
    _publish(tmp, final)
    return final


def _write_version(recipe: Recipe, trained: Trained, heldout: Path, final: Path) -> None:
    tmp = _scratch(final.parent, f".tmp-{recipe.version}-")
    shutil.copyfile(trained.weights, tmp / ARTIFACT)
    (tmp / "calibration").mkdir()
    records = json.loads((heldout / "labels.json").read_text())[:N_CALIBRATION]
    images = []
    for record in records:
        name = f"calibration/{Path(record['file']).name}"
        shutil.copyfile(heldout / record["file"], tmp / name)
        expected = [ExpectedBox(class_name=b["class_name"], box=b["box"]) for b in record["boxes"]]
        images.append(CalibrationImage(file=name, expected=expected))
    manifest = Manifest(
        name=MODEL_NAME, version=recipe.version, backend="ultralytics", task="detect",
        artifact=ARTIFACT, format=ARTIFACT_FORMAT, architecture=trained.architecture,
        sha256=sha256_of(tmp / ARTIFACT), classes=CLASSES, input_size=IMAGE_SIZE, created_at=CREATED_AT,
        calibration=Calibration(images=images, min_recall=0.5, match_iou=0.5, conf=0.25),
        lineage={**_lineage(recipe), "metrics": {"mAP50": round(trained.map50, 4)}},
    )  # fmt: skip
    (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    _publish(tmp, final)


def _write_training_data(work: Path) -> Path:
    for split, n, seed in (("train", N_TRAIN, DATA_SEED), ("val", N_VAL, DATA_SEED + 1)):
        write_dataset(work / "data" / split, n, seed)
    data_yaml = work / "data.yaml"
    names = {str(k): v for k, v in CLASSES.items()}
    spec = {"path": str(work / "data"), "train": "train/images", "val": "val/images", "names": names}
    data_yaml.write_text(json.dumps(spec))  # JSON is YAML
    return data_yaml


def build_zoo(root: Path, *, force: bool = False, progress: Progress | None = None, large: bool = False) -> list[Path]:
    """Build every missing version (all of them with `force`); returns the detect and task version
    directories (2.0.1 and 2.1.0-drift are derived from 2.0.0 as well: `control/zoo_variants.py`).
    The modelscope families (`control/zoo_faces.py`, `large` adding the big ones),
    MTCNN's published face weights (`control/zoo_mtcnn.py`, where facenet-pytorch is installed)
    and the YOLO segment and pose families (`control/zoo_tasks.py`) build on this module."""
    from control import zoo_variants
    from control.zoo_faces import build_faces
    from control.zoo_mtcnn import build_mtcnn
    from control.zoo_tasks import build_tasks

    say = progress or (lambda _message: None)
    root = root.resolve()
    # The segment and pose lines train beside the rest, each training in a child with its share
    # of the cores (`_child_init`: one on two cores, what ultralytics gives a training alone
    # there). A training loads its data in its compute thread, so one alone left a core idle;
    # measured on two cores, shapes-pose trained in 79 s alone and 82 s beside another, with the
    # same weights byte for byte.
    with ThreadPoolExecutor(1, thread_name_prefix="zoo-tasks") as side:
        tasks = side.submit(build_tasks, root, force=force, progress=progress)
        build_faces(root, force=force, progress=say, large=large)
        build_mtcnn(root, force=force, progress=say)
        detect = _build_detect(root, force, say)
        zoo_variants.build_variants(root, force=force, progress=say)  # 2.0.1 and 2.1.0-drift, from 2.0.0
        return [*detect, *tasks.result()]


def _build_detect(root: Path, force: bool, say: Progress) -> list[Path]:
    finals = [root / MODEL_NAME / r.version for r in RECIPES]
    with _locked(root):
        _sweep(root)
        heldout = _build_heldout(root)
        todo = [(r, f) for r, f in zip(RECIPES, finals, strict=True) if force or not is_complete(f, r)]
        if not todo:
            return finals
        (root / ".work").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root / ".work") as work_name:
            work = Path(work_name)
            data_yaml = _write_training_data(work)
            # Training runs in a spawned child: ultralytics flips process-wide torch state
            # (deterministic algorithms, thread count, seeds) that the caller must not inherit.
            context = get_context("spawn")
            init = (offline_env(root),)
            with ProcessPoolExecutor(1, mp_context=context, initializer=_child_init, initargs=init) as pool:
                for recipe, final in todo:
                    say(f"training {MODEL_NAME} {recipe.version} ({recipe.epochs} epochs)")
                    future = pool.submit(_train, recipe, str(data_yaml), str(work / "runs"))
                    trained = future.result()
                    _write_version(recipe, trained, heldout, final)
                    say(f"built {final} (mAP50 {trained.map50:.3f})")
    return finals


def ensure_zoo(root: Path = Path("models")) -> Path:
    build_zoo(root)
    return root
