"""The MTCNN backend with its published weights (control/zoo_mtcnn.py), held to facenet-pytorch's own
`MTCNN` run in-process on the same photos, and to the faces that are really in them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from control.zoo_mtcnn import ARCHITECTURE, MODEL, VERSION, build_mtcnn
from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.repository import ModelRepository, sha256_of
from worker.runtime.validation import check_calibration

if TYPE_CHECKING:
    from conftest import BestFirst, MtcnnReference

REPO = Path(__file__).resolve().parents[3]
LIMITS = ImageLimits(max_bytes=10**8, max_pixels=10**8)
PHOTOS = ("bus.jpg", "zidane.jpg")
#: Faces facing the camera, as counted on the photos: bus.jpg's two men in front of the bus (the
#: others are cut by the border or turned away); zidane.jpg's two men, and MTCNN also takes up to
#: two blurred faces in the crowd behind them (scores 0.76, 0.78).
PLAUSIBLE = {"bus.jpg": range(2, 5), "zidane.jpg": range(2, 5)}
SURE = 0.99  # the faces facing the camera score ≥ 0.997; the crowd's, below 0.8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("mtcnn-zoo")
    build_mtcnn(root)
    return ModelRepository(root)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    return {name: decode_image((assets / name).read_bytes(), LIMITS) for name in PHOTOS}


def loaded(zoo: ModelRepository) -> Any:
    entry = zoo.get(MODEL, VERSION)
    backend = create_backend("mtcnn", "cpu", task="face-detection")
    backend.load(zoo.verified_artifact(entry), entry.manifest)
    return backend


def test_equals_facenet_pytorch_mtcnn_in_process(zoo: ModelRepository, photos: dict[str, np.ndarray],
                                                 mtcnn_reference: MtcnnReference, best_first: BestFirst) -> None:
    reference = mtcnn_reference()
    backend = loaded(zoo)
    for name, image in photos.items():
        (ours,) = backend.predict([image], InferenceParams(conf=0.0, max_det=1000))
        boxes, probs, points = reference.detect(np.ascontiguousarray(image[:, :, ::-1]), landmarks=True)  # RGB
        theirs = best_first(np.asarray(boxes, np.float32), np.asarray(probs, np.float32),
                            np.asarray(points, np.float32))
        assert ours.keypoints is not None and len(ours) == len(theirs[0]) > 0, name
        mine = best_first(ours.boxes, ours.scores, ours.keypoints[:, :, :2])
        for field, a, b in zip(("boxes", "probabilities", "landmarks"), mine, theirs, strict=True):
            assert np.allclose(a, b, atol=1e-3, rtol=0), f"{name}: {field} differ by {np.abs(a - b).max()}"
        assert np.all(ours.keypoints[:, :, 2] == 1.0) and set(ours.class_ids.tolist()) == {0}
    backend.release()


def test_finds_the_real_faces_with_landmarks_inside(zoo: ModelRepository, photos: dict[str, np.ndarray]) -> None:
    backend = loaded(zoo)
    for name, image in photos.items():
        (found,) = backend.predict([image], InferenceParams())
        assert len(found) in PLAUSIBLE[name], f"{name}: {len(found)} faces"
        assert (found.scores >= SURE).sum() == 2, f"{name}: scores {found.scores}"
        assert np.all(np.diff(found.scores) <= 0), "not best first"
        assert found.keypoints is not None and found.keypoints.shape == (len(found), 5, 3)
        for box, points in zip(found.boxes, found.keypoints, strict=True):
            x1, y1, x2, y2 = box
            xs, ys = points[:, 0], points[:, 1]
            assert np.all((x1 <= xs) & (xs <= x2) & (y1 <= ys) & (ys <= y2)), f"{name}: landmarks outside {box}"
            left_eye, right_eye, nose, mouth_left, mouth_right = points[:, :2]
            # FACE_LANDMARKS' order, "left" being the image's: eyes above the nose above the mouth.
            assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0], name
            assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]), name
    (capped,) = backend.predict([photos["zidane.jpg"]], InferenceParams(max_det=1, conf=0.9))
    (blank,) = backend.predict([np.full((640, 640, 3), 114, np.uint8)], InferenceParams())
    (tiny,) = backend.predict([np.zeros((10, 300, 3), np.uint8)], InferenceParams())
    assert len(capped) == 1 and len(blank) == 0 and len(tiny) == 0
    backend.release()


def test_version_passes_its_golden_calibration(zoo: ModelRepository) -> None:
    entry = zoo.get(MODEL, VERSION)
    assert entry.manifest.calibration is not None
    assert [len(i.expected) for i in entry.manifest.calibration.images] == [2, 4]  # as measured: bus, zidane
    backend = loaded(zoo)
    backend.warm_up()
    assert check_calibration(backend, entry.manifest, entry.path).recall == 1.0
    backend.release()


@pytest.mark.parametrize("change, named", [
    ({"kind": "retinaface"}, r"kind: Input should be 'mtcnn'"),
    ({"thresholds": [0.6, 0.7]}, r"thresholds"),
    ({"thresholds": [0.6, 0.7, 7.0]}, r"thresholds: Value error, thresholds are probabilities"),
    ({"nms": 0.5}, r"nms: Extra inputs are not permitted"),
])
def test_wrong_architecture_is_refused_naming_it(zoo: ModelRepository, change: dict[str, Any], named: str) -> None:
    entry = zoo.get(MODEL, VERSION)
    manifest = entry.manifest.model_copy(update={"architecture": {**ARCHITECTURE, **change}})
    with pytest.raises(BackendError, match=r"not an MTCNN this backend builds \(.*" + named):
        create_backend("mtcnn", "cpu", task="face-detection").load(entry.path / entry.manifest.artifact, manifest)


@pytest.mark.parametrize("key, named", [
    ("onet.dense6_3.weight", r"missing: onet\.dense6_3\.weight"),  # the landmark head
    ("pnet.prelu1.weight", r"missing: pnet\.prelu1\.weight"),
])
def test_artifact_missing_a_tensor_is_refused_naming_it(zoo: ModelRepository, tmp_path: Path, key: str,
                                                       named: str) -> None:
    entry = zoo.get(MODEL, VERSION)
    tensors = load_file(entry.path / entry.manifest.artifact)
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors")
    manifest = entry.manifest.model_copy(update={"sha256": sha256_of(tmp_path / "model.safetensors")})
    with pytest.raises(BackendError, match=named):
        create_backend("mtcnn", "cpu", task="face-detection").load(tmp_path / "model.safetensors", manifest)


def test_artifact_with_a_misshapen_tensor_is_refused_naming_it(zoo: ModelRepository, tmp_path: Path) -> None:
    import torch

    entry = zoo.get(MODEL, VERSION)
    tensors = load_file(entry.path / entry.manifest.artifact)
    tensors["rnet.dense4.weight"] = torch.zeros(128, 577)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(BackendError, match=r"rnet refuses .*size mismatch for dense4\.weight"):
        create_backend("mtcnn", "cpu", task="face-detection").load(tmp_path / "model.safetensors", entry.manifest)


def test_zoo_build_is_deterministic_and_skips_what_is_built(zoo: ModelRepository, tmp_path: Path) -> None:
    first = zoo.get(MODEL, VERSION).path
    messages: list[str] = []
    assert build_mtcnn(first.parents[1], progress=messages.append) == [first] and messages == []  # built: skipped
    (again,) = build_mtcnn(tmp_path, force=True)
    for name in ("model.safetensors", "manifest.json", "calibration/bus.jpg", "calibration/zidane.jpg"):
        assert sha256_of(again / name) == sha256_of(first / name), name
    manifest = Manifest.model_validate_json((again / "manifest.json").read_bytes())
    assert manifest.architecture == json.loads(json.dumps(ARCHITECTURE)) and manifest.backend == "mtcnn"


def test_zoo_without_facenet_pytorch_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # as if not installed
    messages: list[str] = []
    assert build_mtcnn(tmp_path, progress=messages.append) == []
    assert messages == ["SKIPPED faces-mtcnn (MTCNN, real face weights): facenet-pytorch is not installed; install "
                        "it with  pip install --no-deps facenet-pytorch==2.6.0  (--no-deps: its pins are older than "
                        "our torch)"]
    assert not (tmp_path / MODEL).exists()


def test_worker_without_facenet_pytorch_gets_the_install_hint() -> None:
    code = (
        "import sys; sys.modules['facenet_pytorch'] = None\n"
        "from worker.runtime.backend import BackendError, create_backend\n"
        "try:\n"
        "    create_backend('mtcnn', 'cpu', task='face-detection')\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("; install it with  pip install --no-deps facenet-pytorch==2.6.0"), done.stdout
