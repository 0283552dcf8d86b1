"""A model that costs nothing: the worker's own overhead, measured (`hotswap loadtest bench`).

Its artifact is a small JSON file (manifest format `json`), `{"kind": "trivial"}`, optionally with
`"whole_image": true` (one box covering the whole image, class 0, instead of no detections). No framework, no torch:
whatever a job costs on a trivial version is transport, parsing, decoding and bookkeeping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from schemas.jobs import Box, Detection, InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, Image
from worker.runtime.weights import JSON, ArtifactLoader

ARTIFACT_KIND = "trivial"
MAX_ARTIFACT_BYTES = 64 * 1024


def trivial_artifact(*, whole_image: bool = False) -> bytes:
    """The bytes of a valid artifact."""
    return json.dumps({"kind": ARTIFACT_KIND, "whole_image": whole_image}, sort_keys=True).encode()


class TrivialBackend:
    def __init__(self, device: str, loader: ArtifactLoader | None = None) -> None:
        self.device = device  # nothing runs on it
        self.loader = loader or ArtifactLoader()
        self._manifest: Manifest | None = None
        self._whole_image = False

    def load(self, artifact: Path, manifest: Manifest) -> None:
        self.loader.check(manifest, JSON)
        if not artifact.is_file():
            raise BackendError(f"artifact {artifact} does not exist")
        spec = self.loader.json(artifact, manifest, MAX_ARTIFACT_BYTES)
        if not isinstance(spec, dict) or spec.get("kind") != ARTIFACT_KIND:
            raise BackendError(f'artifact {artifact.name} is not a trivial model ({{"kind": "trivial"}})')
        whole_image = spec.get("whole_image", False)
        if not isinstance(whole_image, bool):
            raise BackendError("whole_image must be true or false")
        if manifest.task != "detect":
            raise BackendError(f"a trivial model detects; the manifest says {manifest.task}")
        self._manifest, self._whole_image = manifest, whole_image

    def warm_up(self) -> None:
        self._loaded_manifest()

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[list[Detection]]:
        manifest = self._loaded_manifest()
        if not self._whole_image:
            return [[] for _ in images]
        name = manifest.classes.get(0, "0")
        return [
            [Detection(class_id=0, class_name=name, score=1.0,
                       box=Box.of((0.0, 0.0, float(image.shape[1]), float(image.shape[0]))))]
            for image in images
        ]

    def release(self) -> None:
        self._manifest = None

    def _loaded_manifest(self) -> Manifest:
        if self._manifest is None:
            raise BackendError("model is not loaded")
        return self._manifest
