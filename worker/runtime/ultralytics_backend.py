"""YOLO models through `ultralytics`.

Detect, segment and pose models are served through a TorchScript trace of the network
(`worker.runtime.tracing`) rather than `YOLO.predict`: the traced forward does not hold the GIL,
so the worker's event loop and its inference thread run side by side (on this project's 2-core
machine, 128-px images: 8.5 against 15.0 ms per image beside a busy Python thread, 7.9 against
10.6 ms alone). The trace (`ServedNetwork`) also holds the conversion of the letterboxed bytes
and the batch-wide half of NMS, so one call does all of it. Pre- and post-processing are
ultralytics' own (`LetterBox`, `scale_boxes`; for masks `process_mask_native`, as
`retina_masks=True` does, so they come at the original image's size; for keypoints
`scale_coords`) or equal to it bit for bit (NMS, `worker.runtime.yolo_nms`), with the arguments
its predictor of the task passes, so the answers are those of `YOLO.predict` (tests hold them to
it). Classification goes through `YOLO.predict`, on a `YOLO` built around the version's network
(`ultralytics_networks.yolo_around`).

The network comes from the manifest's architecture and the artifact's weights (safetensors or a
weights-only state dict), or, where the manifest says pickle and the worker allows it, from a
pickled ultralytics checkpoint (`ultralytics_networks.load_network`).
"""

from __future__ import annotations

import functools
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
from worker.runtime.yolo_nms import Rows, candidates, suppress

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
    """A detect, segment or pose network traced by TorchScript with its input conversion and the
    batch-wide half of NMS (`ServedNetwork`); thread-safe, any batch size and input shape.
    Post-processing is what ultralytics' predictor of the task does, call for call, on numpy arrays
    where it can be (ultralytics' functions take both)."""

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
        end2end = bool(getattr(network, "end2end", False))
        classes = int(network.model[-1].nc)  # the head's, whatever names the manifest gives
        served = ServedNetwork(network, classes, nms=not end2end).eval()
        architecture = {"yaml": getattr(network, "yaml", None), "strides": network.stride.tolist(), "classes": classes,
                        "nms": not end2end}
        example = torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)
        # A threshold below every score: the check compares every anchor's row, whatever the weights.
        module = traced(served, example, architecture, settings=(_threshold(-1.0),))
        kpt_shape = getattr(network, "kpt_shape", None)
        return cls(module, stride, end2end, device, task, classes,
                   (int(kpt_shape[0]), int(kpt_shape[1])) if task == "pose" and kpt_shape else None)

    def __call__(self, images: Sequence[Image], params: InferenceParams, size: int) -> list[Prediction]:
        from ultralytics.data.augment import LetterBox

        # As the predictor does: the size rounded up to the stride, and a batch of one shape
        # padded to the stride only (rect), not to a square.
        size = math.ceil(size / self.stride) * self.stride
        same_shape = len({image.shape for image in images}) == 1
        letterbox = LetterBox((size, size), auto=same_shape, stride=self.stride)
        with STEPS.step("letterbox"):
            boxed = np.stack([letterbox(image=image) for image in images])
        with torch.inference_mode():
            with STEPS.step("to device"):
                batch = batch_on_device(boxed, self.device)
            with STEPS.step("forward"):
                output = self.module(batch, _threshold(params.conf))
            with STEPS.step("nms"):
                kept, protos = self._kept(output, params)
            shape = boxed.shape[1:3]
            if protos is not None:
                return [_segmented(found, shape, image.shape, proto) for found, image, proto
                        in zip(kept, images, protos, strict=True)]
        with STEPS.step("scale"):
            if same_shape:  # one scaling for the whole batch: the same gain and padding for each image
                return self._posed_batch(kept, shape, images[0].shape)
            return [self._posed(found, shape, image.shape) for found, image in zip(kept, images, strict=True)]

    def _kept(self, output: Any, params: InferenceParams) -> tuple[list[Rows], torch.Tensor | None]:
        """Each image's rows after NMS, on the host, and a segment network's mask prototypes."""
        if self.end2end:  # no suppression: ultralytics only filters these
            from ultralytics.utils.nms import non_max_suppression

            predictions, protos = output if self.task == "segment" else (output, None)
            nc = 0 if self.task == "detect" else self.classes  # where class scores end
            kept = non_max_suppression(predictions, params.conf, params.iou, max_det=params.max_det, nc=nc,
                                       end2end=True)
            return [rows.cpu().numpy() for rows in kept], protos
        found, counts, *rest = output
        return suppress(found, counts, params.iou, params.max_det), (rest[0] if rest else None)

    def _posed_batch(self, kept: list[Rows], shape: tuple[int, ...], original: tuple[int, ...]) -> list[Prediction]:
        """`_posed` of each image's rows, the images all of one size: scaled at once, then split
        (the same arithmetic on each row)."""
        bounds = np.cumsum([0, *(len(found) for found in kept)]).tolist()
        rows = self._posed(np.concatenate(kept), shape, original)
        points = rows.keypoints
        return [Prediction(rows.boxes[a:b], rows.scores[a:b], rows.class_ids[a:b],
                           keypoints=None if points is None else points[a:b]) for a, b in itertools.pairwise(bounds)]

    def _posed(self, found: Rows, shape: tuple[int, ...], original: tuple[int, ...]) -> Prediction:
        """Detect and pose, as `DetectionPredictor` and `PosePredictor.construct_result`."""
        from ultralytics.utils.ops import scale_boxes, scale_coords

        found[:, :4] = scale_boxes(shape, found[:, :4], original)
        if self.kpt_shape is None:
            return Prediction.from_rows(found[:, :6])
        points = scale_coords(shape, found[:, 6:].reshape(len(found), *self.kpt_shape), original)
        return Prediction.from_rows(found[:, :6], keypoints=_with_visibility(points))


@functools.lru_cache(maxsize=64)
def _threshold(conf: float) -> torch.Tensor:
    """A confidence threshold as the served network's input: made once per value, not per batch."""
    return torch.tensor(conf, dtype=torch.float32)


def batch_on_device(boxed: npt.NDArray[np.uint8], device: str) -> torch.Tensor:
    """Letterboxed BGR uint8 images (N×H×W×3, on the host) on `device`, still uint8: only those
    bytes cross to a GPU (a quarter of the floats), from page-locked memory so the copy is DMA and
    does not wait; the conversion (`network_input`) then runs on the device, in the trace."""
    host = torch.from_numpy(boxed)
    pinned = device.startswith("cuda")
    return (host.pin_memory() if pinned else host).to(device, non_blocking=pinned)


def network_input(batch: torch.Tensor) -> torch.Tensor:
    """Letterboxed BGR uint8 images (N×H×W×3) as the network takes them: RGB, channels first,
    floats in [0, 1]."""
    return batch.permute(0, 3, 1, 2).contiguous().flip(1).float().div_(255)


def _segmented(found: Rows, shape: tuple[int, ...], original: tuple[int, ...], proto: torch.Tensor) -> Prediction:
    """As `SegmentationPredictor.construct_result` with retina_masks: masks at the original size."""
    from ultralytics.utils.ops import process_mask_native, scale_boxes

    height, width = original[:2]
    if len(found) == 0:
        return Prediction.from_rows(found[:, :6], masks=np.zeros((0, height, width), np.bool_))
    found[:, :4] = scale_boxes(shape, found[:, :4], original)
    rows = torch.from_numpy(found).to(proto.device)
    masks = process_mask_native(proto, rows[:, 6:], rows[:, :4], (height, width))
    keep = (masks.amax((-2, -1)) > 0).cpu().numpy()  # the predictor drops detections whose mask came out empty
    if not keep.all():
        found, masks = found[keep], masks[torch.from_numpy(keep).to(masks.device)]
    return Prediction.from_rows(found[:, :6], masks=masks.cpu().numpy() > 0)


def _with_visibility(points: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    points = points.astype(np.float32)
    if points.shape[-1] == 2:  # a model trained without visibility: every point counts as seen
        points = np.concatenate([points, np.ones((*points.shape[:-1], 1), np.float32)], axis=-1)
    return points


class ServedNetwork(torch.nn.Module):
    """What is traced and served: letterboxed uint8 images in (`batch_on_device`), the network's
    NMS candidates out (`yolo_nms.candidates`: all rows in one tensor, the count per image) and a
    segment network's mask prototypes; an end2end network's predictions as they come.

    Conversion, forward and candidates in one traced call: the inference thread gives the GIL up
    once for all of them. Called one by one from Python, each tensor operation gives it up and
    takes it back, and waits whenever the event loop holds it meanwhile (for shapes at batch 1, 33
    such round trips an image before, 6 now; the README's Performance section)."""

    def __init__(self, network: torch.nn.Module, classes: int, nms: bool) -> None:
        super().__init__()
        self.network = network
        self.classes = classes
        self.nms = nms

    def forward(self, batch: torch.Tensor, conf: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        y = self.network(network_input(batch))
        # In eval mode a YOLO head answers (predictions, raw outputs); a segment head's predictions
        # are themselves (predictions, mask prototypes).
        first: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = y[0] if isinstance(y, list | tuple) else y
        if not self.nms:
            return first
        predictions, protos = first if isinstance(first, tuple) else (first, None)
        found, counts = candidates(predictions, conf, self.classes)
        return (found, counts) if protos is None else (found, counts, protos)


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
