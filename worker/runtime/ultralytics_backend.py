"""YOLO models through `ultralytics`.

Detect, segment and pose models are served through a TorchScript trace of the network
(`worker.runtime.tracing`) rather than `YOLO.predict`: the traced forward does not hold the GIL,
so the worker's event loop and its inference thread run side by side (on this project's 2-core
machine, 128-px images: 8.5 against 15.0 ms per image beside a busy Python thread, 7.9 against
10.6 ms alone). Pre- and post-processing are ultralytics' own (`LetterBox`, `non_max_suppression`,
`scale_boxes`; for masks `process_mask_native`, as `retina_masks=True` does, so they come at the
original image's size; for keypoints `scale_coords`) with the arguments its predictor of the task
passes, so the answers are those of `YOLO.predict` (tests hold them to it). Classification goes
through `YOLO.predict`, on a `YOLO` built around the version's network
(`ultralytics_networks.yolo_around`).

The network comes from the manifest's architecture and the artifact's weights (safetensors or a
weights-only state dict), or, where the manifest says pickle and the worker allows it, from a
pickled ultralytics checkpoint (`ultralytics_networks.load_network`).
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, Image, blank_image
from worker.runtime.predictions import Prediction
from worker.runtime.profiling import STEPS
from worker.runtime.tracing import traced
from worker.runtime.ultralytics_networks import Network, load_network, yolo_around
from worker.runtime.weights import ArtifactLoader, PickleRefused
from worker.runtime.yolo_nms import batch_nms

if TYPE_CHECKING:
    from ultralytics import YOLO


def prepare_offline_environment() -> None:
    """Keep ultralytics from reaching for the network or writing into ~/.config."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "hotswap" / "ultralytics"))


#: Tasks served through the traced network; the rest (classify) through `YOLO.predict`.
TRACED_TASKS = frozenset({"detect", "segment", "pose"})


@dataclass(frozen=True)
class TracedYolo:
    """A detect, segment or pose network traced by TorchScript; thread-safe, any batch size and
    input shape. Post-processing is what ultralytics' predictor of the task does, call for call."""

    module: torch.jit.ScriptModule
    stride: int
    end2end: bool
    device: str
    task: str
    classes: int
    kpt_shape: tuple[int, int] | None

    @classmethod
    def trace(cls, network: Network, device: str, size: int, task: str) -> TracedYolo:
        # As ultralytics' predictor runs it: Conv+BN fused, weights channels-last (about 15 % faster
        # on CPU than contiguous ones here).
        network = network.fuse(verbose=False).eval().to(device, memory_format=torch.channels_last)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        for module in network.modules():
            if hasattr(module, "dynamic"):  # the head rebuilds its anchors for each input shape, traced
                module.dynamic = True
        stride = max(int(network.stride.max()), 32)
        architecture = {"yaml": getattr(network, "yaml", None), "strides": network.stride.tolist()}
        example = torch.zeros(1, 3, size, size, device=device)
        module = traced(FirstOutput(network).eval(), example, architecture)
        kpt_shape = getattr(network, "kpt_shape", None)
        classes = int(network.model[-1].nc)  # the head's, whatever names the manifest gives
        return cls(module, stride, bool(getattr(network, "end2end", False)), device, task, classes,
                   (int(kpt_shape[0]), int(kpt_shape[1])) if task == "pose" and kpt_shape else None)

    def __call__(self, images: Sequence[Image], params: InferenceParams, size: int) -> list[Prediction]:
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.nms import non_max_suppression

        # As the predictor does: the size rounded up to the stride, and a batch of one shape
        # padded to the stride only (rect), not to a square.
        size = math.ceil(size / self.stride) * self.stride
        same_shape = len({image.shape for image in images}) == 1
        letterbox = LetterBox((size, size), auto=same_shape, stride=self.stride)
        with STEPS.step("letterbox"):
            boxed = np.stack([letterbox(image=image) for image in images])
        with torch.inference_mode():
            with STEPS.step("to tensor"):
                batch = batch_on_device(boxed, self.device)
            with STEPS.step("forward"):
                output = self.module(batch)
            predictions, protos = output if self.task == "segment" else (output, None)
            with STEPS.step("nms"):
                # nc tells NMS where class scores end and mask coefficients or keypoints begin.
                nc = 0 if self.task == "detect" else self.classes
                if self.end2end:  # no suppression: ultralytics only filters these
                    kept = non_max_suppression(predictions, params.conf, params.iou, max_det=params.max_det,
                                               nc=nc, end2end=True)
                else:
                    kept = batch_nms(predictions, params.conf, params.iou, params.max_det, nc)
            shape = batch.shape[2:]
            if protos is not None:
                return [_segmented(found, shape, image.shape, proto) for found, image, proto
                        in zip(kept, images, protos, strict=True)]
            with STEPS.step("scale"):
                if same_shape:  # one scaling for the whole batch: the same gain and padding for each image
                    return self._posed_batch(kept, shape, images[0].shape)
                return [self._posed(found, shape, image.shape) for found, image in zip(kept, images, strict=True)]

    def _posed_batch(self, kept: list[torch.Tensor], shape: torch.Size, original: tuple[int, ...]) -> list[Prediction]:
        """`_posed` of each image's rows, the images all of one size: scaled and copied to the host
        at once, then split (the same arithmetic on each row)."""
        bounds = np.cumsum([0, *(len(found) for found in kept)]).tolist()
        rows = self._posed(torch.cat(kept), shape, original)
        points = rows.keypoints
        return [Prediction(rows.boxes[a:b], rows.scores[a:b], rows.class_ids[a:b],
                           keypoints=None if points is None else points[a:b]) for a, b in itertools.pairwise(bounds)]

    def _posed(self, found: torch.Tensor, shape: torch.Size, original: tuple[int, ...]) -> Prediction:
        """Detect and pose, as `DetectionPredictor` and `PosePredictor.construct_result`."""
        from ultralytics.utils.ops import scale_boxes, scale_coords

        found[:, :4] = scale_boxes(shape, found[:, :4], original)
        if self.kpt_shape is None:
            return Prediction.from_rows(found[:, :6].cpu().numpy())
        points = scale_coords(shape, found[:, 6:].view(len(found), *self.kpt_shape), original)
        return Prediction.from_rows(found[:, :6].cpu().numpy(), keypoints=_with_visibility(points.cpu().numpy()))


def batch_on_device(boxed: npt.NDArray[np.uint8], device: str) -> torch.Tensor:
    """Letterboxed BGR uint8 images (N×H×W×3, on the host) as the network's input on `device`:
    RGB, channels first, floats in [0, 1]. Only the uint8 bytes cross to a GPU (a quarter of the
    floats), from page-locked memory so the copy is DMA and does not wait; the conversion then
    runs on the device."""
    host = torch.from_numpy(boxed)
    pinned = device.startswith("cuda")
    on_device = (host.pin_memory() if pinned else host).to(device, non_blocking=pinned)
    return on_device.permute(0, 3, 1, 2).contiguous().flip(1).float().div_(255)


def _segmented(found: torch.Tensor, shape: torch.Size, original: tuple[int, ...], proto: torch.Tensor) -> Prediction:
    """As `SegmentationPredictor.construct_result` with retina_masks: masks at the original size."""
    from ultralytics.utils.ops import process_mask_native, scale_boxes

    height, width = original[:2]
    if len(found) == 0:
        return Prediction.from_rows(found[:, :6].cpu().numpy(), masks=np.zeros((0, height, width), np.bool_))
    found[:, :4] = scale_boxes(shape, found[:, :4], original)
    masks = process_mask_native(proto, found[:, 6:], found[:, :4], (height, width))
    keep = masks.amax((-2, -1)) > 0  # the predictor drops detections whose mask came out empty
    if not keep.all():
        found, masks = found[keep], masks[keep]
    return Prediction.from_rows(found[:, :6].cpu().numpy(), masks=masks.cpu().numpy() > 0)


def _with_visibility(points: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    points = points.astype(np.float32)
    if points.shape[-1] == 2:  # a model trained without visibility: every point counts as seen
        points = np.concatenate([points, np.ones((*points.shape[:-1], 1), np.float32)], axis=-1)
    return points


class FirstOutput(torch.nn.Module):
    """In eval mode a YOLO head returns (predictions, raw outputs): the predictions alone (for a
    segment head, the predictions and its mask prototypes)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.network(x)
        first: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = y[0] if isinstance(y, list | tuple) else y
        return first


class UltralyticsBackend:
    def __init__(self, device: str, loader: ArtifactLoader | None = None) -> None:
        self.device = device
        self.loader = loader or ArtifactLoader()
        self._model: YOLO | None = None
        self._traced: TracedYolo | None = None
        self._manifest: Manifest | None = None
        # A YOLO predictor keeps per-call state: on the `YOLO.predict` path, serving and
        # validation (measuring this version as a latency baseline) must take turns.
        self._lock = threading.Lock()

    def load(self, artifact: Path, manifest: Manifest) -> None:
        if not artifact.is_file():
            raise BackendError(f"artifact {artifact} does not exist")
        prepare_offline_environment()
        try:
            network = load_network(artifact, manifest, self.loader).to(self.device)
            if manifest.task not in TRACED_TASKS:
                self._model = yolo_around(network, manifest)
        except PickleRefused:
            raise  # not a broken artifact but a refused one: its reason says why
        except Exception as exc:  # any failure here means the artifact is unusable
            raise BackendError(f"ultralytics could not load {artifact.name}: {exc}") from exc
        if manifest.task in TRACED_TASKS:
            try:
                self._traced = TracedYolo.trace(network, self.device, manifest.input_size, manifest.task)
            except Exception as exc:  # a network TorchScript cannot trace is unusable here
                raise BackendError(f"could not trace {artifact.name} for serving: {exc}") from exc
        self._manifest = manifest

    def warm_up(self) -> None:
        size = self._loaded_manifest().input_size
        try:
            # Twice: TorchScript's profiling executor optimises the graph on its second run.
            for _ in range(2):
                self.predict([blank_image(size)], InferenceParams())
        except BackendError:
            raise
        except Exception as exc:  # a layer made for another input shape shows at the first forward
            raise BackendError(f"ultralytics' first forward failed: {exc}") from exc

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        manifest = self._loaded_manifest()
        size = params.imgsz or manifest.input_size
        if self._traced is not None:
            return self._traced(images, params, size)
        model = self._loaded_model()
        with self._lock:
            # retina_masks: masks at the original image's size, as the wire contract has them.
            results = model.predict(list(images), conf=params.conf, iou=params.iou, max_det=params.max_det,
                                    imgsz=size, device=self.device, verbose=False, retina_masks=True)
        return [_prediction(result) for result in results]

    def release(self) -> None:
        self._model = None
        self._traced = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _loaded_model(self) -> YOLO:
        if self._model is None:
            raise BackendError("model is not loaded")
        return self._model

    def _loaded_manifest(self) -> Manifest:
        if self._manifest is None:
            raise BackendError("model is not loaded")
        return self._manifest


def _prediction(result: Any) -> Prediction:
    """An ultralytics `Results` of a task not traced here (classify) as arrays."""
    if result.probs is not None:
        return Prediction.of(probs=result.probs.data.cpu().numpy().astype(np.float32))
    return Prediction.from_rows(result.boxes.data.cpu().numpy()[:, :6])
