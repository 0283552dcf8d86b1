"""The backend protocol every model family implements, and the registry that picks one.

The registry knows no backend itself: it takes entries (`BackendEntry`: a name, the tasks served,
where the class lives) from three places, each later one winning for the backend and task it names:

1. the built-ins, `worker/runtime/builtin_backends.py` (read, as an entry point would be, by name);
2. entry points of the group `hotswap.backends` that other installed packages declare,
   `name = "their.module:ENTRY"` (name: the backend's), ENTRY a `BackendEntry` (or a sequence of
   them) in a module that imports no framework;
3. `register_backend(...)`, for code that runs before the worker creates its backends.

1 and 2 are read once, on first use, never at import: `hotswap --help` reads none. A backend's
own module (and the framework it imports) is imported only when a version asks for that backend.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest, Task
from worker.runtime.predictions import Prediction

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from worker.runtime.weights import ArtifactLoader

log = logging.getLogger(__name__)

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
    factory: str  # "package.module:Class", called as Class(device, loader)
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


#: Where the built-in entries are, read like an entry point's target (the registry imports no backend).
BUILTIN = "worker.runtime.builtin_backends:BUILTIN"
#: The entry-point group other packages declare their backends in.
ENTRY_POINT_GROUP = "hotswap.backends"

#: What `register_backend` was given; wins over what was found.
_REGISTERED: dict[tuple[str, str], BackendEntry] = {}
#: The built-ins and the entry points, once read; None until the first lookup.
_FOUND: dict[tuple[str, str], BackendEntry] | None = None
#: Entry points that could not be loaded, by their name (the backend's, by convention): said when
#: that backend is asked for, besides the warning logged when they were read.
_BROKEN: dict[str, str] = {}
_READING = threading.Lock()


def register_backend(entry: BackendEntry) -> None:
    """Make a backend available for its tasks; a later entry for the same backend and task wins."""
    for task in entry.tasks:
        _REGISTERED[entry.name, task] = entry


def entries_of(target: object, origin: str) -> list[BackendEntry]:
    """The entries an entry point's target holds: one `BackendEntry`, or a sequence of them."""
    entries = [target] if isinstance(target, BackendEntry) else target
    if not isinstance(entries, list | tuple) or not all(isinstance(e, BackendEntry) for e in entries):
        raise BackendError(f"{origin} is not a BackendEntry nor a sequence of them: {target!r}")
    return list(entries)


def _load(spec: str) -> object:
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _entry_points() -> Iterable[EntryPoint]:
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP)


def _found() -> dict[tuple[str, str], BackendEntry]:
    """The built-ins, then each entry point (in the order the metadata lists them), read once."""
    global _FOUND
    with _READING:  # the control thread and on-demand loads may both be first
        if _FOUND is None:
            found: dict[tuple[str, str], BackendEntry] = {}
            entries = entries_of(_load(BUILTIN), BUILTIN)
            for ep in _entry_points():
                origin = f"entry point {ep.name} = {ep.value!r} ({ENTRY_POINT_GROUP})"
                try:
                    entries += entries_of(ep.load(), origin)
                except Exception as exc:  # one broken package must not take the other backends with it
                    _BROKEN[ep.name] = f"{origin} cannot be loaded ({type(exc).__name__}: {exc})"
                    log.warning("backend %s", _BROKEN[ep.name])
            for entry in entries:
                for task in entry.tasks:
                    found[entry.name, task] = entry
            _FOUND = found
        return _FOUND


def registered() -> dict[tuple[str, str], BackendEntry]:
    """Every (backend, task) the registry serves, and the entry serving it."""
    return {**_found(), **_REGISTERED}


def create_backend(
    name: str, device: str, loader: ArtifactLoader | None = None, *, task: str = "detect"
) -> ModelBackend:
    """A backend serving `task` on `device`; `loader` (default: no pickles) reads its artifacts."""
    from worker.runtime.weights import ArtifactLoader

    entries = registered()
    entry = entries.get((name, task))
    if entry is None:
        backends = sorted({b for b, _ in entries})
        if name not in backends:
            broken = f"; {_BROKEN[name]}" if name in _BROKEN else ""
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(backends)}{broken}")
        tasks = sorted(t for b, t in entries if b == name)
        raise BackendError(f"backend {name!r} does not serve task {task!r}; it serves {', '.join(tasks)}")
    return entry.load_factory()(device, loader or ArtifactLoader())
