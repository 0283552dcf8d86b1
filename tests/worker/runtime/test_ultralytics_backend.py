from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from schemas.jobs import InferenceParams
from worker.runtime.backend import BackendError, ModelBackend, create_backend
from worker.runtime.images import ImageLimits, decode_image
from worker.runtime.repository import ModelRepository

if TYPE_CHECKING:
    from conftest import HeldOut, Reference

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)


@pytest.fixture(scope="module")
def backend(zoo: Path) -> Iterator[ModelBackend]:
    repository = ModelRepository(zoo)
    entry = repository.get("shapes", "2.0.0")
    model = create_backend("ultralytics", "cpu")
    model.load(repository.verified_artifact(entry), entry.manifest)
    model.warm_up()
    yield model
    model.release()


def test_batch_predictions_equal_in_process_ultralytics(
    backend: ModelBackend, zoo: Path, heldout: list[HeldOut], bus_jpg: Path, reference: Reference
) -> None:
    yolo = reference(zoo / "shapes" / "2.0.0")
    # ultralytics letterboxes a batch of mixed sizes differently from single images, so the
    # same-sized held-out images go as one batch and the photo alone.
    paths = [item.path for item in heldout[:6]]
    ours = backend.predict([decode_image(p.read_bytes(), LIMITS) for p in paths], InferenceParams(conf=0.1))
    ours += backend.predict([decode_image(bus_jpg.read_bytes(), LIMITS)], InferenceParams(conf=0.1))
    for path, detections in zip([*paths, bus_jpg], ours, strict=True):
        theirs = yolo.predict(str(path), imgsz=128, conf=0.1, verbose=False)[0].boxes
        assert len(detections) == len(theirs), path
        assert np.allclose(detections.boxes, theirs.xyxy.numpy(), atol=1e-3), path
        assert np.allclose(detections.scores, theirs.conf.numpy(), atol=1e-3), path
        assert np.array_equal(detections.class_ids, theirs.cls.numpy().astype(np.int64)), path


def test_boxes_are_in_original_image_pixels(backend: ModelBackend, bus_jpg: Path) -> None:
    image = decode_image(bus_jpg.read_bytes(), LIMITS)
    (detections,) = backend.predict([image], InferenceParams(conf=0.01))
    height, width = image.shape[:2]
    assert len(detections), "a 0.01 threshold finds something on a real photo"
    x1, y1, x2, y2 = detections.boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    assert (x1 <= x2).all() and (y1 <= y2).all()
    assert x2.max() > 128, "boxes were not scaled back from the 128 px input"


def test_params_are_honoured(backend: ModelBackend, heldout: list[HeldOut]) -> None:
    image = decode_image(heldout[0].path.read_bytes(), LIMITS)
    (loose,) = backend.predict([image], InferenceParams(conf=0.01))
    (capped,) = backend.predict([image], InferenceParams(conf=0.01, max_det=1))
    (strict,) = backend.predict([image], InferenceParams(conf=0.99))
    assert len(loose) > 1 and len(capped) == 1 and len(strict) < len(loose)


def test_loading_garbage_is_a_backend_error(tmp_path: Path, zoo: Path) -> None:
    entry = ModelRepository(zoo).get("shapes", "1.0.0")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(BackendError, match="could not load"):
        create_backend("ultralytics", "cpu").load(garbage, entry.manifest)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(BackendError, match="unknown backend 'onnx'"):
        create_backend("onnx", "cpu")


def test_versions_of_one_architecture_share_one_trace(zoo: Path, heldout: list[HeldOut]) -> None:
    """TorchScript never frees what a trace registers: a worker loading version after version must
    trace each architecture once, and every version still computes with its own weights. The
    networks are built once per architecture too (a copy of a template for every later load)."""
    from worker.runtime import tracing, ultralytics_networks

    repository = ModelRepository(zoo)
    image = decode_image(heldout[0].path.read_bytes(), LIMITS)
    answers, templates, built = {}, [], []
    for name in ("1.0.0", "2.0.0", "1.0.0"):
        entry = repository.get("shapes", name)
        model = create_backend("ultralytics", "cpu")
        model.load(repository.verified_artifact(entry), entry.manifest)
        templates.append(len(tracing._templates))
        built.append(len(ultralytics_networks._templates))
        (answers[name],) = model.predict([image], InferenceParams(conf=0.1))
        model.release()
    assert templates[0] >= 1 and templates[1:] == [templates[0]] * 2, f"traced again: {templates}"
    assert built[0] >= 1 and built[2] == built[1], f"built again: {built}"
    boxes = {name: [(int(c), round(float(b[0]), 1)) for c, b in zip(found.class_ids, found.boxes, strict=True)]
             for name, found in answers.items()}
    assert boxes["1.0.0"] != boxes["2.0.0"], "two versions sharing a trace answered alike: weights not loaded"


def test_a_built_network_is_a_copy_of_its_architectures_template(zoo: Path) -> None:
    """Each build hands out its own network: weights loaded into one (or a fuse, which rewrites its
    layers) never reach the next build or the template."""
    import torch

    from worker.runtime.ultralytics_networks import build_network

    manifest = ModelRepository(zoo).get("shapes", "2.0.0").manifest
    assert manifest.architecture is not None
    first = build_network(manifest.architecture, "detect")
    before = {name: t.clone() for name, t in first.state_dict().items()}
    with torch.no_grad():
        for parameter in first.parameters():
            parameter.fill_(0.5)
    first.fuse(verbose=False)
    second = build_network(manifest.architecture, "detect")
    assert second is not first
    assert all(torch.equal(t, before[name]) for name, t in second.state_dict().items())


def test_a_trace_that_disagrees_with_its_network_is_refused() -> None:
    import torch

    from worker.runtime.tracing import TraceMismatch, traced

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)
            self.flip = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -x * self.scale if self.flip else x * self.scale  # a Python branch the trace bakes in

    first, second = Branchy().eval(), Branchy().eval()
    second.flip = True  # same weights' shapes, same declared architecture, other computation
    traced(first, torch.zeros(1, 3), architecture="branchy")
    with pytest.raises(TraceMismatch):
        traced(second, torch.zeros(1, 3), architecture="branchy")


def _letterboxed(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)


def test_a_batch_reaches_the_network_as_rgb_channels_first_in_unit_floats() -> None:
    from worker.runtime.ultralytics_backend import batch_on_device, network_input

    boxed = _letterboxed()
    batch = network_input(batch_on_device(boxed, "cpu"))
    expected = boxed[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255
    assert batch.dtype.is_floating_point and tuple(batch.shape) == (3, 3, 64, 96)
    assert np.allclose(batch.numpy(), expected, atol=1e-7)


@pytest.mark.gpu
def test_on_a_gpu_the_batch_is_copied_from_pinned_memory_and_converted_there() -> None:
    import torch

    from worker.runtime.memory import memory_in_use
    from worker.runtime.ultralytics_backend import batch_on_device, network_input

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run on a GPU machine (hotswap loadtest bench --only 1 --device cuda there too)")
    boxed = _letterboxed(1)
    batch = network_input(batch_on_device(boxed, "cuda"))
    torch.cuda.synchronize()
    assert batch.device.type == "cuda" and memory_in_use("cuda") >= batch.numel() * 4
    assert torch.equal(batch.cpu(), network_input(batch_on_device(boxed, "cpu")))
