"""The zoo's data generator and its build/caching logic, with training replaced by a stub."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control import zoo, zoo_tasks, zoo_variants
from schemas.manifest import Manifest
from worker.runtime.repository import sha256_of


def test_generator_is_deterministic_per_seed() -> None:
    a_img, a_boxes = zoo.make_shapes_image(np.random.default_rng(7))
    b_img, b_boxes = zoo.make_shapes_image(np.random.default_rng(7))
    c_img, _ = zoo.make_shapes_image(np.random.default_rng(8))
    assert np.array_equal(a_img, b_img) and a_boxes == b_boxes
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("size", [64, 128, 320])
def test_boxes_lie_inside_the_image_and_do_not_overlap(size: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        image, boxes = zoo.make_shapes_image(rng, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert 1 <= len(boxes) <= 4
        for class_id, x1, y1, x2, y2 in boxes:
            assert class_id in zoo.CLASSES
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        for i, a in enumerate(boxes):
            assert not any(zoo._overlap(a, b) for b in boxes[i + 1 :])


def test_shapes_are_drawn_where_their_boxes_say() -> None:
    image, boxes = zoo.make_shapes_image(np.random.default_rng(3))
    plain = image.astype(float)
    for _, x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        inside = plain[cy - 2 : cy + 3, cx - 2 : cx + 3].mean((0, 1))
        corner = plain[:3, :3].mean((0, 1))  # shapes never touch the border
        assert np.abs(inside - corner).sum() > 60


def test_write_dataset_labels_agree(tmp_path: Path) -> None:
    records = zoo.write_dataset(tmp_path, 5, seed=1)
    assert json.loads((tmp_path / "labels.json").read_text()) == records
    for i, record in enumerate(records):
        assert (tmp_path / record["file"]).is_file()
        yolo = (tmp_path / f"labels/{i:03d}.txt").read_text().split("\n")[:-1]
        assert len(yolo) == len(record["boxes"])
        for line, box in zip(yolo, record["boxes"], strict=True):
            class_id, *xywh = line.split()
            x1, y1, x2, y2 = box["box"]
            assert int(class_id) == box["class_id"] and box["class_name"] == zoo.CLASSES[box["class_id"]]
            expected = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
            assert [float(v) * 128 for v in xywh] == pytest.approx(expected, abs=1e-3)
    held = zoo.write_dataset(tmp_path / "held", 5, seed=1, yolo_labels=False)
    assert held == records and not (tmp_path / "held/labels").exists()


class _InlinePool:
    """Stands in for the process pool so a stub `_train` runs in this process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replaces training by writing a fake checkpoint; records which versions were trained."""
    versions: list[str] = []

    def fake_train(recipe: zoo.Recipe, data_yaml: str, project: str) -> zoo.Trained:
        assert Path(data_yaml).is_file()
        versions.append(recipe.version)
        weights = Path(project) / f"{recipe.version}.safetensors"
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(f"weights of {recipe.version} #{len(versions)}".encode())
        return zoo.Trained(str(weights), 0.5, {"backbone": [], "head": [], "stub": recipe.version})

    monkeypatch.setattr(zoo, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(zoo, "_train", fake_train)
    monkeypatch.setattr(zoo_tasks, "build_tasks", lambda root, **_: [])  # its own tests train those
    monkeypatch.setattr(zoo_variants, "build_variants", lambda root, **_: [])  # they need real weights
    return versions


def test_build_zoo_builds_the_task_families_too(tmp_path: Path, trained: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, dict[str, Any]]] = []
    tasks_dir = tmp_path / "shapes-seg" / "1.0.0"

    def fake_build_tasks(root: Path, **options: Any) -> list[Path]:
        calls.append((root, options))
        return [tasks_dir]

    monkeypatch.setattr(zoo_tasks, "build_tasks", fake_build_tasks)
    say: list[str] = []
    dirs = zoo.build_zoo(tmp_path, force=True, progress=say.append)
    assert calls == [(tmp_path.resolve(), {"force": True, "progress": say.append})]
    assert dirs[-1] == tasks_dir and [d.name for d in dirs[:-1]] == trained


def test_build_zoo_trains_the_task_families_beside_the_detect_family(
        tmp_path: Path, trained: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    tasks_started = threading.Event()
    train_detect = zoo._train  # the fixture's stub

    def build_tasks(root: Path, **_: Any) -> list[Path]:
        tasks_started.set()
        return []

    def train_once_tasks_train(recipe: zoo.Recipe, data_yaml: str, project: str) -> zoo.Trained:
        assert tasks_started.wait(10), "the task families waited for the detect family to finish"
        return train_detect(recipe, data_yaml, project)

    monkeypatch.setattr(zoo_tasks, "build_tasks", build_tasks)
    monkeypatch.setattr(zoo, "_train", train_once_tasks_train)
    zoo.build_zoo(tmp_path)
    assert trained == ["1.0.0", "2.0.0", "0.9.0-bad"]


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (4, 2), (32, 8)])
def test_a_training_child_takes_its_share_of_the_cores(cores: int, threads: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ultralytics.utils import torch_utils

    monkeypatch.setattr(torch_utils, "NUM_THREADS", torch_utils.NUM_THREADS)  # restored afterwards
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    zoo._child_init({"YOLO_OFFLINE": "1"})
    assert threads == torch_utils.NUM_THREADS


def test_build_writes_valid_versions_and_caches(tmp_path: Path, trained: list[str]) -> None:
    messages: list[str] = []
    dirs = zoo.build_zoo(tmp_path, progress=messages.append)
    assert trained == ["1.0.0", "2.0.0", "0.9.0-bad"]
    assert [d.name for d in dirs] == trained and messages
    for d in dirs:
        manifest = Manifest.model_validate_json((d / "manifest.json").read_text())
        assert zoo.is_complete(d) and manifest.version == d.name
        assert (manifest.artifact, manifest.format) == ("model.safetensors", "safetensors")
        assert manifest.architecture == {"backbone": [], "head": [], "stub": d.name}
        assert manifest.created_at == zoo.CREATED_AT and manifest.lineage["metrics"] == {"mAP50": 0.5}
        assert manifest.calibration is not None and len(manifest.calibration.images) == 8
        assert all((d / image.file).is_file() for image in manifest.calibration.images)
    assert json.loads((tmp_path / "_data/shapes-heldout/labels.json").read_text())
    assert not list((tmp_path / ".work").iterdir()) and not list((tmp_path / "shapes").glob(".*"))

    zoo.build_zoo(tmp_path)
    assert len(trained) == 3  # second run trains nothing


def test_tampered_or_half_written_version_is_rebuilt(tmp_path: Path, trained: list[str]) -> None:
    zoo.build_zoo(tmp_path)
    first = (tmp_path / "shapes/1.0.0/manifest.json").read_bytes()
    (tmp_path / "shapes/2.0.0/model.safetensors").write_bytes(b"tampered")
    (tmp_path / "shapes/0.9.0-bad/manifest.json").unlink()
    leftover = tmp_path / "shapes/.tmp-2.0.0-dead"
    leftover.mkdir()
    assert not zoo.is_complete(tmp_path / "shapes/2.0.0")

    zoo.build_zoo(tmp_path)
    assert trained[3:] == ["2.0.0", "0.9.0-bad"]
    assert (tmp_path / "shapes/1.0.0/manifest.json").read_bytes() == first
    assert all(zoo.is_complete(d) for d in (tmp_path / "shapes").iterdir())
    assert not leftover.exists()

    zoo.build_zoo(tmp_path, force=True)
    assert len(trained) == 8


def test_changed_recipe_or_generator_makes_versions_stale(
    tmp_path: Path, trained: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo.build_zoo(tmp_path)
    monkeypatch.setattr(zoo, "RECIPES", (zoo.RECIPES[0], zoo.Recipe("2.0.0", "1.0.0", epochs=21)))
    assert not zoo.is_complete(tmp_path / "shapes/2.0.0", zoo.RECIPES[1])
    zoo.build_zoo(tmp_path)
    assert trained[3:] == ["2.0.0"]

    spec = tmp_path / "_data/shapes-heldout/dataset.json"
    before = spec.read_text()
    monkeypatch.setattr(zoo, "GENERATOR", zoo.GENERATOR + 1)
    zoo.build_zoo(tmp_path)
    assert trained[4:] == ["1.0.0", "2.0.0"] and spec.read_text() != before


def test_versions_of_an_older_artifact_format_are_rebuilt(tmp_path: Path, trained: list[str]) -> None:
    """A zoo built before artifact formats (a pickled model.pt, manifest schema 1) counts as stale,
    and so does a version whose manifest names another format than the zoo writes now."""
    zoo.build_zoo(tmp_path)
    old = json.loads((tmp_path / "shapes/1.0.0/manifest.json").read_text())
    (tmp_path / "shapes/1.0.0/model.pt").write_bytes(b"a pickled checkpoint")
    old.update(schema_version=1, artifact="model.pt", sha256=sha256_of(tmp_path / "shapes/1.0.0/model.pt"))
    del old["format"], old["architecture"]
    (tmp_path / "shapes/1.0.0/manifest.json").write_text(json.dumps(old))
    other = json.loads((tmp_path / "shapes/2.0.0/manifest.json").read_text())
    (tmp_path / "shapes/2.0.0/manifest.json").write_text(json.dumps({**other, "format": "state-dict"}))
    assert not zoo.is_complete(tmp_path / "shapes/1.0.0") and not zoo.is_complete(tmp_path / "shapes/2.0.0")

    zoo.build_zoo(tmp_path)
    assert trained[3:] == ["1.0.0", "2.0.0"]
    assert not (tmp_path / "shapes/1.0.0/model.pt").exists()


def test_is_complete_rejects_bad_manifests(tmp_path: Path) -> None:
    assert not zoo.is_complete(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("{not json")
    assert not zoo.is_complete(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "shapes"}))
    assert not zoo.is_complete(tmp_path)
