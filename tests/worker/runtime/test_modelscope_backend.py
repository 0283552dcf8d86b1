"""The modelscope backend on real modelscope networks (seeded, biased: control/zoo_faces.py), held
to modelscope's own pipeline run in-process on the same model directory."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from control.zoo_faces import build_faces
from schemas.jobs import InferenceParams
from worker.runtime.backend import BackendError, create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.repository import ModelRepository
from worker.runtime.validation import ValidationFailed, check_calibration, check_requirements

if TYPE_CHECKING:
    from conftest import BestFirst, ModelscopeReference

REPO = Path(__file__).resolve().parents[3]
LIMITS = ImageLimits(max_bytes=10**8, max_pixels=10**8)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("faces-zoo")
    build_faces(root)
    return ModelRepository(root)


@pytest.fixture(scope="module")
def large(zoo: Path) -> ModelRepository:
    """MogFace and M2FP (~600 MB): built once into the test zoo and kept there."""
    build_faces(zoo, large=True)
    return ModelRepository(zoo)


def loaded(repository: ModelRepository, model: str, version: str) -> Any:
    entry = repository.get(model, version)
    backend = create_backend("modelscope", "cpu", task=entry.manifest.task)
    backend.load(repository.verified_artifact(entry), entry.manifest)
    return backend


def calibration_images(repository: ModelRepository, model: str, version: str) -> list[np.ndarray]:
    entry = repository.get(model, version)
    assert entry.manifest.calibration is not None
    return [decode_image((entry.path / i.file).read_bytes(), LIMITS) for i in entry.manifest.calibration.images]


def test_ulfd_equals_in_process_pipeline(faces: ModelRepository, tmp_path: Path,
                                        modelscope_reference: ModelscopeReference, best_first: BestFirst) -> None:
    backend = loaded(faces, "faces", "1.0.0")
    reference = modelscope_reference(faces.get("faces", "1.0.0").path, tmp_path)
    images = calibration_images(faces, "faces", "1.0.0")
    ours = backend.predict(images, InferenceParams(conf=0.0, max_det=1000))
    for image, prediction in zip(images, ours, strict=True):
        theirs = reference(image)
        boxes, scores = best_first(np.asarray(theirs["boxes"], np.float32).reshape(-1, 4),
                                   np.asarray(theirs["scores"], np.float32))
        assert len(prediction) == len(boxes) > 0
        mine, my_scores = best_first(prediction.boxes, prediction.scores)
        assert np.allclose(mine, boxes, atol=1e-3) and np.allclose(my_scores, scores, atol=1e-3)
        assert prediction.keypoints is None and set(prediction.class_ids.tolist()) == {0}
    backend.release()


def test_versions_answer_differently_and_pass_their_golden_calibration(faces: ModelRepository) -> None:
    answers = {}
    for version in ("1.0.0", "2.0.0"):
        entry = faces.get("faces", version)
        backend = loaded(faces, "faces", version)
        backend.warm_up()
        assert check_calibration(backend, entry.manifest, entry.path).recall == 1.0
        answers[version] = backend.predict(calibration_images(faces, "faces", "1.0.0"), InferenceParams())
        backend.release()
    assert all(len(p) for found in answers.values() for p in found), "a version found no face on an image"
    assert [len(p) for p in answers["1.0.0"]] != [len(p) for p in answers["2.0.0"]]


def test_params_and_two_threads(faces: ModelRepository) -> None:
    backend = loaded(faces, "faces", "2.0.0")
    image = calibration_images(faces, "faces", "2.0.0")[0]
    (alone,) = backend.predict([image], InferenceParams())
    (capped,) = backend.predict([image], InferenceParams(max_det=3))
    (none,) = backend.predict([image], InferenceParams(conf=1.0))
    assert len(capped) == 3 and len(none) == 0 and np.array_equal(capped.boxes, alone.boxes[:3])
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(backend.predict([image] * 3, InferenceParams())))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(p.boxes, alone.boxes) for found in results for p in found) and len(results) == 2
    backend.release()


def test_broken_version_is_refused_naming_the_shape_mismatch(faces: ModelRepository) -> None:
    with pytest.raises(BackendError, match=r"size mismatch for classification_headers\.3\.weight"):
        loaded(faces, "faces", "0.9.0-broken")


@pytest.mark.parametrize("key, value", [("plugins", ["evil-package"]), ("allow_remote", True)])
def test_configuration_that_imports_code_is_refused(faces: ModelRepository, key: str, value: object) -> None:
    entry = faces.get("faces", "1.0.0")
    assert entry.manifest.architecture is not None
    manifest = entry.manifest.model_copy(update={"architecture": {**entry.manifest.architecture, key: value}})
    with pytest.raises(BackendError, match=f"names {key}: that makes modelscope import code"):
        create_backend("modelscope", "cpu", task="face-detection").load(faces.verified_artifact(entry), manifest)


def test_unmet_requirement_is_refused(faces: ModelRepository) -> None:
    manifest = faces.get("faces", "1.0.0").manifest
    check_requirements(manifest)
    with pytest.raises(ValidationFailed, match=r"modelscope<0\.1 \(installed: "):
        check_requirements(manifest.model_copy(update={"requires": ["modelscope<0.1"]}))


def test_worker_without_modelscope_gets_the_install_hint() -> None:
    code = (
        "import sys; sys.modules['modelscope'] = None\n"
        "from worker.runtime.backend import BackendError, create_backend\n"
        "try:\n"
        "    create_backend('modelscope', 'cpu', task='face-detection')\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("; install it with  pip install 'hotswap[modelscope]'"), done.stdout


# MogFace and M2FP against their in-process pipelines: through the pool, tests/worker/test_task_equality.py.
