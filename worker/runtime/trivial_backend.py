"""A model that costs nothing: the worker's own overhead, measured (`hotswap loadtest bench`).

Its artifact is a small JSON file (manifest format `json`), `{"kind": "trivial"}`, optionally with
`"whole_image": true` (one box covering the whole image, class 0, instead of no detections) and
`"delay_ms": N` (each batch takes that long, in a sleep that releases the GIL as a GPU call does: a
stand-in for a heavy model, or, very long, for a stuck one), and `"fail_above_pixels": N` (a batch
holding a larger image fails: a version that passes its checks on small images and breaks on real
inputs). No framework, no torch: whatever a job
costs on a trivial version is transport, parsing, decoding and bookkeeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, Image
from worker.runtime.predictions import Prediction
from worker.runtime.repository import sha256_of
from worker.runtime.weights import ArtifactLoader

ARTIFACT_KIND = "trivial"
TRIVIAL_MODEL = "trivial"
MAX_ARTIFACT_BYTES = 64 * 1024


def trivial_artifact(*, whole_image: bool = False, delay_ms: float = 0.0,
                     fail_above_pixels: int | None = None) -> bytes:
    """The bytes of a valid artifact."""
    spec = {"kind": ARTIFACT_KIND, "whole_image": whole_image, **({"delay_ms": delay_ms} if delay_ms else {}),
            **({"fail_above_pixels": fail_above_pixels} if fail_above_pixels is not None else {})}
    return json.dumps(spec, sort_keys=True).encode()


def write_trivial_model(root: Path, version: str = "1.0.0", *, whole_image: bool = False, delay_ms: float = 0.0,
                        fail_above_pixels: int | None = None, name: str = TRIVIAL_MODEL,
                        classes: dict[int, str] | None = None, requires: list[str] | None = None) -> Path:
    """`<root>/<name>/<version>/` with a trivial artifact and its manifest; returns the directory."""
    directory = root / name / version
    directory.mkdir(parents=True, exist_ok=True)
    artifact = directory / "model.json"
    artifact.write_bytes(trivial_artifact(whole_image=whole_image, delay_ms=delay_ms,
                                          fail_above_pixels=fail_above_pixels))
    manifest = Manifest(
        name=name, version=version, backend="trivial", task="detect", artifact=artifact.name, format="json",
        sha256=sha256_of(artifact), classes=classes or {0: "thing"}, requires=requires or [], input_size=32,
        created_at=datetime.now(UTC),
        lineage={"note": "written for a trivial model: no network, no torch"},
    )
    (directory / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    return directory


class TrivialBackend:
    def __init__(self, device: str, loader: ArtifactLoader | None = None) -> None:
        self.device = device  # nothing runs on it
        self.loader = loader or ArtifactLoader()
        self._manifest: Manifest | None = None
        self._whole_image = False
        self._delay_s = 0.0
        self._fail_above: int | None = None

    def load(self, artifact: Path, manifest: Manifest) -> None:
        if not artifact.is_file():
            raise BackendError(f"artifact {artifact} does not exist")
        spec = self.loader.json(artifact, manifest, MAX_ARTIFACT_BYTES)  # checks the format first
        if not isinstance(spec, dict) or spec.get("kind") != ARTIFACT_KIND:
            raise BackendError(f'artifact {artifact.name} is not a trivial model ({{"kind": "trivial"}})')
        whole_image = spec.get("whole_image", False)
        if not isinstance(whole_image, bool):
            raise BackendError("whole_image must be true or false")
        delay_ms = spec.get("delay_ms", 0)
        if not isinstance(delay_ms, int | float) or isinstance(delay_ms, bool) or not 0 <= delay_ms <= 3_600_000:
            raise BackendError("delay_ms must be a number of milliseconds from 0 to 3600000")
        fail_above = spec.get("fail_above_pixels")
        if fail_above is not None and (not isinstance(fail_above, int) or isinstance(fail_above, bool)):
            raise BackendError("fail_above_pixels must be a whole number of pixels")
        if manifest.task != "detect":
            raise BackendError(f"a trivial model detects; the manifest says {manifest.task}")
        self._manifest, self._whole_image, self._delay_s = manifest, whole_image, delay_ms / 1000
        self._fail_above = fail_above

    def warm_up(self) -> None:
        self._loaded_manifest()

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        self._loaded_manifest()
        if self._delay_s:
            time.sleep(self._delay_s)
        largest = max((image.shape[0] * image.shape[1] for image in images), default=0)
        if self._fail_above is not None and largest > self._fail_above:
            raise BackendError(f"an image of {largest} pixels is more than this version handles ({self._fail_above})")
        if not self._whole_image:
            return [Prediction.empty() for _ in images]
        return [Prediction.of([(0.0, 0.0, float(image.shape[1]), float(image.shape[0]))], [1.0], [0])
                for image in images]

    def release(self) -> None:
        self._manifest = None

    def _loaded_manifest(self) -> Manifest:
        if self._manifest is None:
            raise BackendError("model is not loaded")
        return self._manifest
