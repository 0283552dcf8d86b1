"""YOLO models through `ultralytics`.

Detection models are served through a TorchScript trace of the network (`worker.runtime.tracing`)
rather than `YOLO.predict`: the traced forward does not hold the GIL, so the worker's event loop
and its inference thread run side by side (on this project's 2-core machine, 128-px images:
8.5 against 15.0 ms per image beside a busy Python thread, 7.9 against 10.6 ms alone).
Pre- and post-processing are ultralytics' own (`LetterBox`, `non_max_suppression`,
`scale_boxes`) with the arguments its predictor passes, so the answers are those of
`YOLO.predict` (a test holds them to it). Other tasks go through `YOLO.predict`, on a `YOLO`
built around the version's network (`ultralytics_networks.yolo_around`).

The network comes from the manifest's architecture and the artifact's weights (safetensors or a
weights-only state dict), or, where the manifest says pickle and the worker allows it, from a
pickled ultralytics checkpoint (`ultralytics_networks.load_network`).
"""

from __future__ import annotations

import gc
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, Image, blank_image
from worker.runtime.predictions import Prediction
from worker.runtime.tracing import traced
from worker.runtime.ultralytics_networks import Network, load_network, yolo_around
from worker.runtime.weights import ArtifactLoader, PickleRefused

if TYPE_CHECKING:
    from ultralytics import YOLO


def prepare_offline_environment() -> None:
    """Keep ultralytics from reaching for the network or writing into ~/.config."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "hotswap" / "ultralytics"))


@dataclass(frozen=True)
class TracedDetector:
    """A detection network traced by TorchScript; thread-safe, any batch size and input shape."""

    module: torch.jit.ScriptModule
    stride: int
    end2end: bool
    device: str

    @classmethod
    def trace(cls, network: Network, device: str, size: int) -> TracedDetector:
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
        return cls(module, stride, bool(getattr(network, "end2end", False)), device)

    def __call__(self, images: Sequence[Image], params: InferenceParams, size: int) -> list[np.ndarray[Any, Any]]:
        """One (n, 6) array per image: x1, y1, x2, y2 in that image's pixels, score, class id."""
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.ops import scale_boxes

        # As the predictor does: the size rounded up to the stride, and a batch of one shape
        # padded to the stride only (rect), not to a square.
        size = math.ceil(size / self.stride) * self.stride
        same_shape = len({image.shape for image in images}) == 1
        letterbox = LetterBox((size, size), auto=same_shape, stride=self.stride)
        boxed = np.stack([letterbox(image=image) for image in images])
        with torch.inference_mode():
            batch = torch.from_numpy(boxed).to(self.device).permute(0, 3, 1, 2).contiguous().flip(1).float().div_(255)
            kept = non_max_suppression(self.module(batch), params.conf, params.iou, max_det=params.max_det,
                                       end2end=self.end2end)
            for found, image in zip(kept, images, strict=True):
                found[:, :4] = scale_boxes(batch.shape[2:], found[:, :4], image.shape)
            return [found[:, :6].cpu().numpy() for found in kept]


class FirstOutput(torch.nn.Module):
    """In eval mode a YOLO head returns (predictions, raw outputs): the predictions alone."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        first: torch.Tensor = y[0] if isinstance(y, list | tuple) else y
        return first


class UltralyticsBackend:
    def __init__(self, device: str, loader: ArtifactLoader | None = None) -> None:
        self.device = device
        self.loader = loader or ArtifactLoader()
        self._model: YOLO | None = None
        self._detector: TracedDetector | None = None
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
            if manifest.task != "detect":
                self._model = yolo_around(network, manifest)
        except PickleRefused:
            raise  # not a broken artifact but a refused one: its reason says why
        except Exception as exc:  # any failure here means the artifact is unusable
            raise BackendError(f"ultralytics could not load {artifact.name}: {exc}") from exc
        if manifest.task == "detect":
            try:
                self._detector = TracedDetector.trace(network, self.device, manifest.input_size)
            except Exception as exc:  # a network TorchScript cannot trace is unusable here
                raise BackendError(f"could not trace {artifact.name} for serving: {exc}") from exc
        self._manifest = manifest

    def warm_up(self) -> None:
        # Twice: TorchScript's profiling executor optimises the graph on its second run.
        for _ in range(2):
            self.predict([blank_image(self._loaded_manifest().input_size)], InferenceParams())

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        manifest = self._loaded_manifest()
        size = params.imgsz or manifest.input_size
        if self._detector is not None:
            return [Prediction.from_rows(rows) for rows in self._detector(images, params, size)]
        model = self._loaded_model()
        with self._lock:
            # retina_masks: masks at the original image's size, as the wire contract has them.
            results = model.predict(list(images), conf=params.conf, iou=params.iou, max_det=params.max_det,
                                    imgsz=size, device=self.device, verbose=False, retina_masks=True)
        return [_prediction(result) for result in results]

    def release(self) -> None:
        self._model = None
        self._detector = None
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
    """An ultralytics `Results` as arrays: boxes, and the masks, keypoints or class scores its task adds."""
    if result.probs is not None:
        return Prediction.of(probs=result.probs.data.cpu().numpy().astype(np.float32))
    extra: dict[str, Any] = {}
    if result.masks is not None:
        extra["masks"] = result.masks.data.cpu().numpy() > 0.5
    if result.keypoints is not None:
        points = result.keypoints.data.cpu().numpy().astype(np.float32)
        if points.shape[-1] == 2:  # a model trained without visibility: every point counts as seen
            points = np.concatenate([points, np.ones((*points.shape[:-1], 1), np.float32)], axis=-1)
        extra["keypoints"] = points
    return Prediction.from_rows(result.boxes.data.cpu().numpy()[:, :6], **extra)
