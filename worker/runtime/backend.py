"""The backend protocol every model family implements, and the registry that picks one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from schemas.jobs import Detection, InferenceParams
from schemas.manifest import Manifest

if TYPE_CHECKING:
    from worker.runtime.weights import ArtifactLoader

#: A decoded image: height × width × 3, uint8, BGR (OpenCV and ultralytics order).
Image = npt.NDArray[np.uint8]


def blank_image(size: int) -> Image:
    """A grey square: warm-up input, and latency probe for versions without calibration images."""
    return np.full((size, size, 3), 114, dtype=np.uint8)


class BackendError(Exception):
    """Loading or running a model failed; the message says why."""


class ModelBackend(Protocol):
    """One loaded model version. All methods block: the worker calls them in threads, and
    `predict` may be called from two at once (serving, and validation measuring a baseline).

    `load` reads the artifact through the `ArtifactLoader` the backend was created with, in a
    format its manifest names: that loader is where "artifacts cannot run code" is enforced."""

    def load(self, artifact: Path, manifest: Manifest) -> None: ...

    def warm_up(self) -> None: ...

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[list[Detection]]:
        """One list of detections per image, boxes in that image's pixels."""
        ...

    def release(self) -> None: ...


BackendFactory = Callable[[str, "ArtifactLoader"], ModelBackend]


def create_backend(name: str, device: str, loader: ArtifactLoader | None = None) -> ModelBackend:
    """A backend for `device`; `loader` (default: no pickles) reads its artifacts."""
    from worker.runtime.weights import ArtifactLoader

    factory = _factories().get(name)
    if factory is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(_factories()))}")
    return factory(device, loader or ArtifactLoader())


def _factories() -> dict[str, BackendFactory]:
    # Imported lazily: each backend drags in a heavy framework.
    from worker.runtime.trivial_backend import TrivialBackend
    from worker.runtime.ultralytics_backend import UltralyticsBackend

    return {"ultralytics": UltralyticsBackend, "trivial": TrivialBackend}
