"""Artifacts cannot run code: weights are data, the architecture declarative, a pickle opt-in."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.predictions import Prediction
from worker.runtime.repository import ModelRepository, sha256_of
from worker.runtime.trivial_backend import TrivialBackend, write_trivial_model
from worker.runtime.weights import ArtifactLoader, PickleRefused

if TYPE_CHECKING:
    from conftest import HeldOut, Reference

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)
PICKLES = ArtifactLoader(allow_pickle=True)


@pytest.fixture
def version(zoo: Path) -> tuple[Manifest, Path]:
    entry = ModelRepository(zoo).get("shapes", "2.0.0")
    return entry.manifest, entry.artifact


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture
def trojaned(tmp_path: Path, marker: Path, trojan: Callable[[Path, Path], Path]) -> Path:
    path = trojan(tmp_path / "model.pt", marker)
    _prove_the_payload_is_real(path, marker)
    return path


def _prove_the_payload_is_real(path: Path, marker: Path) -> None:
    # A trojan that never fires would make every test below pass for nothing.
    import torch

    torch.load(shutil.copyfile(path, path.with_suffix(".probe")), weights_only=False)
    assert marker.exists(), "the trojan's payload does not run when unpickled"
    marker.unlink()


def with_(manifest: Manifest, **changes: Any) -> Manifest:
    return Manifest.model_validate({**manifest.model_dump(), **changes})


def boxes(found: Prediction) -> np.ndarray[Any, Any]:
    return np.column_stack([found.boxes, found.scores, found.class_ids]).reshape(-1, 6)


@pytest.mark.parametrize(("fmt", "reason"), [
    ("pickle", "does not allow pickles"),
    ("safetensors", "not a valid safetensors file"),  # the manifest lies about its artifact
    ("state-dict", "not a valid state-dict file: .*Unsupported global"),
])
def test_a_trojaned_checkpoint_never_runs_by_default(
    version: tuple[Manifest, Path], trojaned: Path, marker: Path, fmt: str, reason: str
) -> None:
    manifest = with_(version[0], format=fmt, artifact="model.pt", sha256=sha256_of(trojaned))
    with pytest.raises(BackendError, match=reason) as refused:
        create_backend("ultralytics", "cpu").load(trojaned, manifest)
    assert isinstance(refused.value, PickleRefused) == (fmt == "pickle")
    assert not marker.exists(), "the payload ran"
    # Allowing pickles changes nothing for a manifest that says weights: they are never unpickled.
    if fmt != "pickle":
        with pytest.raises(BackendError, match=reason):
            create_backend("ultralytics", "cpu", PICKLES).load(trojaned, manifest)
        assert not marker.exists(), "the payload ran with pickles allowed"


def test_the_trivial_backend_reads_json_only(tmp_path: Path, trojaned: Path, marker: Path) -> None:
    manifest = ModelRepository(write_trivial_model(tmp_path).parent.parent).get("trivial", "1.0.0").manifest
    assert manifest.format == "json"
    with pytest.raises(BackendError, match="does not load pickle artifacts"):
        TrivialBackend("cpu", PICKLES).load(trojaned, with_(manifest, format="pickle"))
    with pytest.raises(BackendError, match="not JSON"):
        TrivialBackend("cpu", PICKLES).load(trojaned, manifest)
    assert not marker.exists()


def test_with_pickles_allowed_a_genuine_ultralytics_checkpoint_loads_and_answers_as_its_weights(
    version: tuple[Manifest, Path], zoo: Path, tmp_path: Path, heldout: list[HeldOut], reference: Reference
) -> None:
    manifest, weights = version
    checkpoint = tmp_path / "model.pt"
    reference(zoo / "shapes" / "2.0.0").save(checkpoint)  # as ultralytics writes its checkpoints
    pickled = with_(manifest, format="pickle", artifact="model.pt", architecture=None, sha256=sha256_of(checkpoint))
    with pytest.raises(PickleRefused, match="HOTSWAP_ALLOW_PICKLE"):
        create_backend("ultralytics", "cpu").load(checkpoint, pickled)

    images = [decode_image(item.path.read_bytes(), LIMITS) for item in heldout[:6]]
    answers = []
    for loader, artifact, meta in ((PICKLES, checkpoint, pickled), (ArtifactLoader(), weights, manifest)):
        backend = create_backend("ultralytics", "cpu", loader)
        backend.load(artifact, meta)
        answers.append(backend.predict(images, InferenceParams(conf=0.1)))
        backend.release()
    assert sum(map(len, answers[0])) > 0
    for ours, theirs in zip(*answers, strict=True):
        assert np.allclose(boxes(ours), boxes(theirs), atol=1e-3)


def test_a_weights_only_state_dict_loads_like_safetensors(
    version: tuple[Manifest, Path], tmp_path: Path, heldout: list[HeldOut]
) -> None:
    import torch

    manifest, weights = version
    state_dict = tmp_path / "model.pth"
    torch.save(ArtifactLoader().tensors(weights, manifest), state_dict)
    as_state_dict = with_(manifest, format="state-dict", artifact="model.pth", sha256=sha256_of(state_dict))
    image = [decode_image(heldout[1].path.read_bytes(), LIMITS)]
    answers = []
    for artifact, meta in ((state_dict, as_state_dict), (weights, manifest)):
        backend = create_backend("ultralytics", "cpu")
        backend.load(artifact, meta)
        answers.append(boxes(backend.predict(image, InferenceParams(conf=0.1))[0]))
    assert len(answers[0]) and np.allclose(answers[0], answers[1], atol=1e-4)


def test_a_state_dict_must_be_names_and_tensors(version: tuple[Manifest, Path], tmp_path: Path) -> None:
    import torch

    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    manifest = with_(version[0], format="state-dict", artifact="list.pth")
    with pytest.raises(BackendError, match="maps names to tensors"):
        ArtifactLoader().tensors(tmp_path / "list.pth", manifest)


def _architecture(manifest: Manifest, edit: Callable[[dict[str, Any]], None]) -> Manifest:
    architecture = copy.deepcopy(manifest.architecture)
    assert architecture is not None
    edit(architecture)
    return with_(manifest, architecture=architecture)


def test_an_architecture_that_would_run_code_is_refused_before_it_is_built(
    version: tuple[Manifest, Path], marker: Path
) -> None:
    """ultralytics `eval`s a config's activation and looks layer names up among its globals."""
    manifest, weights = version
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    hostile = {
        "activation": lambda a: a.update(activation=payload),
        "activation from os": lambda a: a.update(activation="nn.SiLU(__import__('os'))"),
        "a loader as a layer": lambda a: a["backbone"].__setitem__(0, [-1, 1, "attempt_load_one_weight", ["x.pt"]]),
        "a fetching layer": lambda a: a["backbone"].__setitem__(0, [-1, 1, "TorchVision", [64, "resnet18"]]),
        "not a layer": lambda a: a["head"].append("Detect"),
    }
    for name, edit in hostile.items():
        with pytest.raises(BackendError) as refused:
            create_backend("ultralytics", "cpu").load(weights, _architecture(manifest, edit))
        assert not marker.exists(), f"{name}: code in the architecture ran"
        assert "architecture" in str(refused.value), (name, refused.value)
    # A plain activation of literals is declarative, and builds.
    plain = _architecture(manifest, lambda a: a.update(activation="nn.SiLU(inplace=True)"))
    create_backend("ultralytics", "cpu").load(weights, plain)


def test_weights_that_do_not_fit_the_architecture_or_the_task_are_refused(version: tuple[Manifest, Path]) -> None:
    manifest, weights = version
    wider = _architecture(manifest, lambda a: a.update(scale="s"))
    with pytest.raises(BackendError, match="do not fit the manifest's architecture"):
        create_backend("ultralytics", "cpu").load(weights, wider)
    with pytest.raises(BackendError, match="not a segment head"):
        create_backend("ultralytics", "cpu").load(weights, with_(manifest, task="segment"))


def test_other_tasks_serve_on_their_own_weights(
    tmp_path: Path, bus_jpg: Path, zoo: Path
) -> None:
    """A segmentation network (seeded random weights) as safetensors, answering as ultralytics
    does on those weights."""
    import torch
    from safetensors.torch import save_file
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO("yolov8n-seg.yaml", task="segment")
    for parameter in yolo.model.parameters():  # random weights that find things on a photo
        parameter.data.normal_(0, 0.5)
    save_file(yolo.model.state_dict(), tmp_path / "model.safetensors")
    base = ModelRepository(zoo).get("shapes", "2.0.0").manifest
    manifest = with_(base, task="segment", calibration=None, classes={i: f"c{i}" for i in range(80)},
                     architecture=json.loads(json.dumps(yolo.model.yaml)),
                     sha256=sha256_of(tmp_path / "model.safetensors"))
    backend = create_backend("ultralytics", "cpu")
    backend.load(tmp_path / "model.safetensors", manifest)
    image = decode_image(bus_jpg.read_bytes(), LIMITS)
    (ours,) = backend.predict([image], InferenceParams(conf=0.01))
    # retina_masks: which detections keep a mask depends on it, and the contract has original-size masks.
    theirs = yolo.predict(image, imgsz=manifest.input_size, conf=0.01, verbose=False,
                          retina_masks=True)[0].boxes.data.numpy()
    # Weights this large saturate every score to 1.0: NMS orders the ties as its sort happens to.
    ours_rows, their_rows = (rows[np.lexsort(rows.T[::-1])] for rows in (boxes(ours), theirs))
    assert len(ours) > 0 and ours_rows.shape == their_rows.shape
    assert np.allclose(ours_rows, their_rows, atol=1e-3)
