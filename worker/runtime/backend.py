"""The backend protocol every model family implements, and the registry that picks one."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest, Task
from worker.runtime.predictions import Prediction

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

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        """One prediction per image, as arrays in that image's pixels: the task's fields filled."""
        ...

    def release(self) -> None: ...


BackendFactory = Callable[[str, "ArtifactLoader"], ModelBackend]


@dataclass(frozen=True)
class BackendEntry:
    """A backend the registry knows: the tasks it serves, and where its class lives. Imported only
    when a version asks for it: each backend drags in a framework (torch, ultralytics, modelscope),
    and a missing optional one must fail that version, not the worker."""

    name: str
    tasks: frozenset[Task]
    factory: str  # "package.module:Class"
    install_hint: str | None = None

    def load_factory(self) -> BackendFactory:
        module_name, _, attribute = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f"; install it with  {self.install_hint}" if self.install_hint else ""
            raise BackendError(f"backend {self.name!r} cannot be imported here ({exc}){hint}") from exc
        factory: BackendFactory = getattr(module, attribute)
        return factory


_REGISTRY: dict[tuple[str, str], BackendEntry] = {}


def register_backend(entry: BackendEntry) -> None:
    """Make a backend available for its tasks; a later entry for the same backend and task wins."""
    for task in entry.tasks:
        _REGISTRY[entry.name, task] = entry


def registered() -> dict[tuple[str, str], BackendEntry]:
    return dict(_REGISTRY)


def create_backend(
    name: str, device: str, loader: ArtifactLoader | None = None, *, task: str = "detect"
) -> ModelBackend:
    """A backend serving `task` on `device`; `loader` (default: no pickles) reads its artifacts."""
    from worker.runtime.weights import ArtifactLoader

    entry = _REGISTRY.get((name, task))
    if entry is None:
        backends = sorted({b for b, _ in _REGISTRY})
        if name not in backends:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(backends)}")
        tasks = sorted(t for b, t in _REGISTRY if b == name)
        raise BackendError(f"backend {name!r} does not serve task {task!r}; it serves {', '.join(tasks)}")
    return entry.load_factory()(device, loader or ArtifactLoader())


register_backend(BackendEntry("trivial", frozenset({"detect"}), "worker.runtime.trivial_backend:TrivialBackend"))
register_backend(BackendEntry(
    "ultralytics", frozenset({"detect", "segment", "pose", "classify"}),
    "worker.runtime.ultralytics_backend:UltralyticsBackend",
))
register_backend(BackendEntry(
    "modelscope", frozenset({"face-detection", "human-parsing"}), "worker.runtime.modelscope_backend:ModelscopeBackend",
    install_hint="pip install 'hotswap[modelscope]'",
))
register_backend(BackendEntry(
    "mtcnn", frozenset({"face-detection"}), "worker.runtime.mtcnn_backend:MtcnnBackend",
    install_hint="pip install --no-deps facenet-pytorch==2.6.0",
))
