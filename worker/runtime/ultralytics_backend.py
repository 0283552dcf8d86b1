"""YOLO models (detect) through `ultralytics`."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.jobs import Box, Detection, InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, Image, blank_image

if TYPE_CHECKING:
    from ultralytics import YOLO


def prepare_offline_environment() -> None:
    """Keep ultralytics from reaching for the network or writing into ~/.config."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "hotswap" / "ultralytics"))


class UltralyticsBackend:
    def __init__(self, device: str) -> None:
        self.device = device
        self._model: YOLO | None = None
        self._manifest: Manifest | None = None
        # A YOLO predictor keeps per-call state: serving and validation (measuring this version
        # as a latency baseline) must take turns.
        self._lock = threading.Lock()

    def load(self, artifact: Path, manifest: Manifest) -> None:
        # The caller has checked the sha256: YOLO() unpickles, and a pickle is code.
        if not artifact.is_file():
            raise BackendError(f"artifact {artifact} does not exist")
        prepare_offline_environment()
        from ultralytics import YOLO

        try:
            model = YOLO(str(artifact), task=manifest.task)
            model.to(self.device)
        except Exception as exc:  # any failure here means the artifact is unusable
            raise BackendError(f"ultralytics could not load {artifact.name}: {exc}") from exc
        if model.task != manifest.task:
            raise BackendError(f"artifact is a {model.task} model, manifest says {manifest.task}")
        self._model, self._manifest = model, manifest

    def warm_up(self) -> None:
        self.predict([blank_image(self._loaded_manifest().input_size)], InferenceParams())

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[list[Detection]]:
        model, manifest = self._loaded_model(), self._loaded_manifest()
        with self._lock:
            results = model.predict(
                list(images),
                conf=params.conf,
                iou=params.iou,
                max_det=params.max_det,
                imgsz=params.imgsz or manifest.input_size,
                device=self.device,
                verbose=False,
            )
        return [self._detections(result, manifest) for result in results]

    def release(self) -> None:
        self._model = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @staticmethod
    def _detections(result: Any, manifest: Manifest) -> list[Detection]:
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().tolist()
        scores = boxes.conf.cpu().numpy().tolist()
        class_ids = boxes.cls.cpu().numpy().astype(int).tolist()
        return [
            Detection(
                class_id=class_id,
                class_name=manifest.classes.get(class_id, str(class_id)),
                score=score,
                box=Box.of(box),
            )
            for box, score, class_id in zip(xyxy, scores, class_ids, strict=True)
        ]

    def _loaded_model(self) -> YOLO:
        if self._model is None:
            raise BackendError("model is not loaded")
        return self._model

    def _loaded_manifest(self) -> Manifest:
        if self._manifest is None:
            raise BackendError("model is not loaded")
        return self._manifest
