"""Face detection with MTCNN (Zhang et al. 2016) and its published weights, as facenet-pytorch ships them.

A version is data: a safetensors artifact holding the three networks' tensors (`pnet.*`, `rnet.*`,
`onet.*`) and a declarative architecture in the manifest, `{"kind": "mtcnn", "min_face_size": 20,
"thresholds": [0.6, 0.7, 0.7], "factor": 0.709}`. The networks are facenet-pytorch's own
`PNet`/`RNet`/`ONet` built with `pretrained=False` (so they read no file: their constructors would
`torch.load` the package's data), filled here with `load_state_dict(strict=True)`; the cascade is
its `detect_face`, the function `facenet_pytorch.MTCNN.detect` calls, so what we serve is what
facenet-pytorch computes. facenet-pytorch 2.6.0 pins torch<2.3 and numpy<2 in its metadata but runs
with this project's torch and numpy 2 unchanged: it is installed with `--no-deps` (see the Makefile).

MTCNN takes RGB; our images are BGR. Its five landmarks come in `FACE_LANDMARKS`' order, where
"left" is the image's left (the subject's right eye and mouth corner): on a frontal face
left_eye.x < right_eye.x, as the README's example answer shows. Its boxes are not clipped to the
image (a face cut by the border reaches past it), as facenet-pytorch returns them.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

# At import, so that a worker without facenet-pytorch gets the registry's install hint.
from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
from facenet_pytorch.models.utils.detect_face import detect_face
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, Image, blank_image
from worker.runtime.predictions import Prediction
from worker.runtime.weights import ArtifactLoader


class MtcnnArchitecture(BaseModel):
    """The manifest's `architecture`: MTCNN's cascade settings, nothing that names code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mtcnn"]
    min_face_size: int = Field(20, ge=12, le=1024, description="smallest face searched for, in pixels")
    thresholds: tuple[float, float, float] = Field((0.6, 0.7, 0.7), description="P-, R-, O-net face scores")
    factor: float = Field(0.709, gt=0.1, lt=1, description="scale step of the image pyramid")

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 <= t <= 1 for t in value):
            raise ValueError("thresholds are probabilities, between 0 and 1")
        return value


def checked_architecture(manifest: Manifest) -> MtcnnArchitecture:
    try:
        return MtcnnArchitecture.model_validate(manifest.architecture or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'architecture'}: {e['msg']}"
                             for e in exc.errors())
        raise BackendError(f"the manifest's architecture is not an MTCNN this backend builds ({problems})") from exc


def build_networks(tensors: Mapping[str, torch.Tensor], device: str) -> dict[str, torch.nn.Module]:
    """P-, R- and O-net holding exactly `tensors`, on `device`, in eval mode."""
    networks: dict[str, torch.nn.Module] = {"pnet": PNet(pretrained=False), "rnet": RNet(pretrained=False),
                                            "onet": ONet(pretrained=False)}
    expected = {f"{name}.{key}" for name, net in networks.items() for key in net.state_dict()}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        # Named with their prefixes: load_state_dict would name them per network, without one.
        listed = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected)) if keys)
        raise BackendError(f"the artifact's tensors are not MTCNN's three networks ({listed})")
    for name, network in networks.items():
        prefix = f"{name}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # a tensor of another shape
            reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise BackendError(f"{name} refuses the artifact's tensors: {reason}") from exc
        network.to(device).eval()
    return networks


class MtcnnBackend:
    """No lock: the networks hold no per-call state and detect_face allocates its own, so serving
    and validation may run the cascade at once."""

    def __init__(self, device: str, loader: ArtifactLoader | None = None) -> None:
        self.device = device
        self.loader = loader or ArtifactLoader()
        self._networks: dict[str, torch.nn.Module] | None = None
        self._architecture: MtcnnArchitecture | None = None
        self._manifest: Manifest | None = None

    def load(self, artifact: Path, manifest: Manifest) -> None:
        if not artifact.is_file():
            raise BackendError(f"artifact {artifact} does not exist")
        self.loader.check(manifest, ("safetensors", "state-dict"))
        if manifest.task != "face-detection":
            raise BackendError(f"MTCNN detects faces; the manifest says {manifest.task}")
        architecture = checked_architecture(manifest)
        tensors = self.loader.tensors(artifact, manifest)
        self._networks = build_networks(tensors, self.device)
        self._architecture, self._manifest = architecture, manifest

    def warm_up(self) -> None:
        manifest, _, _ = self._loaded()
        self.predict([blank_image(manifest.input_size)], InferenceParams())

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        """Faces best first, `params.conf` and `max_det` on top of MTCNN's own thresholds. `imgsz` does
        not apply: MTCNN searches an image pyramid down from `min_face_size`."""
        _, architecture, networks = self._loaded()
        # One image per cascade: detect_face batches only images of one size, and a request's differ.
        return [self._detect(image, architecture, networks, params) for image in images]

    def release(self) -> None:
        self._networks = None
        self._manifest = self._architecture = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _detect(self, image: Image, architecture: MtcnnArchitecture, networks: Mapping[str, torch.nn.Module],
                params: InferenceParams) -> Prediction:
        if min(image.shape[:2]) < architecture.min_face_size:
            return Prediction.empty()  # no pyramid level: detect_face would concatenate nothing
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        with torch.no_grad():  # as MTCNN.detect calls it
            batch_boxes, batch_points = detect_face(
                rgb, architecture.min_face_size, networks["pnet"], networks["rnet"], networks["onet"],
                list(architecture.thresholds), architecture.factor, torch.device(self.device),
            )
        rows = np.asarray(batch_boxes[0], np.float32).reshape(-1, 5)  # x1, y1, x2, y2, probability
        xy = np.asarray(batch_points[0], np.float32).reshape(-1, 5, 2)
        order = np.argsort(-rows[:, 4], kind="stable")
        keep = order[rows[order, 4] >= params.conf][: params.max_det]
        # MTCNN places every landmark it reports: each counts as seen.
        points = np.concatenate([xy[keep], np.ones((len(keep), 5, 1), np.float32)], axis=-1)
        return Prediction.of(rows[keep, :4], rows[keep, 4], np.zeros(len(keep), np.int64), keypoints=points)

    def _loaded(self) -> tuple[Manifest, MtcnnArchitecture, dict[str, torch.nn.Module]]:
        if self._manifest is None or self._architecture is None or self._networks is None:
            raise BackendError("model is not loaded")
        return self._manifest, self._architecture, self._networks
