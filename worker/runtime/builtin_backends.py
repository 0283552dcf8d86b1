"""The backends that come with Hotswap: the registry's first entries (`worker/runtime/backend.py`
reads `BUILTIN` on first use, as it reads other packages' entry points in `hotswap.backends`).

Each names its class by string: nothing here imports a framework, and a backend's module is
imported only when a version asks for it.
"""

from __future__ import annotations

from worker.runtime.backend import BackendEntry

BUILTIN: tuple[BackendEntry, ...] = (
    BackendEntry("trivial", frozenset({"detect"}), "worker.runtime.trivial_backend:TrivialBackend"),
    BackendEntry("ultralytics", frozenset({"detect", "segment", "pose", "classify"}),
                 "worker.runtime.ultralytics_backend:UltralyticsBackend"),
    BackendEntry("modelscope", frozenset({"face-detection", "human-parsing"}),
                 "worker.runtime.modelscope_backend:ModelscopeBackend",
                 install_hint="pip install 'hotswap[modelscope]'"),
    BackendEntry("mtcnn", frozenset({"face-detection"}), "worker.runtime.mtcnn_backend:MtcnnBackend",
                 install_hint="pip install --no-deps facenet-pytorch==2.6.0"),
)
