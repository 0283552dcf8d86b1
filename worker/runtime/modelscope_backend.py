"""Face detection (ULFD, MogFace) and human parsing (M2FP) through modelscope pipelines.

A version is data: a safetensors artifact holding the network's state dict, and modelscope's
`configuration.json` as the manifest's `architecture`. modelscope builds pipelines from a model
directory, so `load` writes a private one and builds `pipeline(task, model=<that absolute path>)`
(an absolute path to an existing directory is never taken for a hub id, so nothing is looked up
online). Only the pipeline types in `FAMILIES` are built, and a configuration that names
`plugins` or `allow_remote` (modelscope's ways of importing code from a model repository) is
refused before anything is written.

The weights never reach modelscope as a file it picked: the face detectors' constructors read
`pytorch_model.pt` themselves (`torch.load(weights_only=True)`), so that file is written here
from the safetensors tensors and holds nothing else; M2FP is built with `pretrained: false` and
reads no file. Either way, the network then gets `load_state_dict(tensors, strict=True)` here:
MogFace and M2FP load with `strict=False` and M2FP silently skips tensors of the wrong shape,
which would serve a half-random network instead of refusing it.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.jobs import InferenceParams
from schemas.manifest import Manifest, Task
from worker.runtime.backend import BackendError, Image, blank_image
from worker.runtime.modelscope_outputs import face_prediction, parsing_prediction
from worker.runtime.predictions import Prediction
from worker.runtime.weights import ArtifactLoader


def prepare_offline_environment() -> None:
    """Keep modelscope (and the Hugging Face libraries it imports) off the network and out of
    ~/.cache/modelscope, and its per-load INFO and WARNING lines out of the worker's log.
    Read when modelscope is imported: call it before."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MODELSCOPE_CACHE", str(Path.home() / ".cache" / "hotswap" / "modelscope"))
    os.environ.setdefault("MODELSCOPE_LOG_LEVEL", "40")


prepare_offline_environment()
# At import, so that a worker without modelscope (or the packages it imports) gets the install hint.
from modelscope.pipelines import pipeline  # noqa: E402

#: modelscope configuration keys that make it import code named by the model repository.
FORBIDDEN_KEYS = frozenset({"plugins", "allow_remote"})
WEIGHTS_FILE = "pytorch_model.pt"  # modelscope's ModelFile.TORCH_MODEL_FILE


@dataclass(frozen=True)
class Family:
    """A pipeline type this backend builds: the task it serves, where the pipeline keeps its network."""

    task: Task
    network: Callable[[Any], torch.nn.Module]
    reads_weights_file: bool  # the pipeline's constructor loads pytorch_model.pt itself
    needs_mmcv: bool = False


FAMILIES: dict[str, Family] = {
    "manual-face-detection-ulfd": Family("face-detection", lambda p: p.detector.net, reads_weights_file=True),
    "resnet101-face-detection-cvpr22papermogface": Family("face-detection", lambda p: p.detector.net,
                                                          reads_weights_file=True),
    "m2fp-image-human-parsing": Family("human-parsing", lambda p: p.model, reads_weights_file=False,
                                       needs_mmcv=True),
}


def checked_configuration(manifest: Manifest) -> tuple[dict[str, Any], Family]:
    """The manifest's modelscope configuration and its family, or why this backend will not build it."""
    config = manifest.architecture
    if config is None:
        raise BackendError("a modelscope version needs its configuration.json as the manifest's architecture")
    forbidden = sorted(_forbidden_keys(config))
    if forbidden:
        raise BackendError(f"the modelscope configuration names {', '.join(forbidden)}: that makes modelscope "
                           "import code from the model repository, which an artifact may not do")
    pipeline_type = (config.get("pipeline") or {}).get("type") if isinstance(config.get("pipeline"), dict) else None
    family = FAMILIES.get(str(pipeline_type))
    if family is None:
        raise BackendError(f"modelscope pipeline type {pipeline_type!r} is not one this backend builds "
                           f"({', '.join(sorted(FAMILIES))})")
    if family.task != manifest.task:
        raise BackendError(f"a {pipeline_type} pipeline serves {family.task}, the manifest says {manifest.task}")
    if config.get("framework") != "pytorch" or not isinstance(config.get("task"), str):
        raise BackendError("the modelscope configuration needs framework 'pytorch' and a task")
    return config, family


def _forbidden_keys(value: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in FORBIDDEN_KEYS:
                found.append(where)
            found += _forbidden_keys(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _forbidden_keys(item, f"{path}[{i}]")
    return found


def build_pipeline(model_dir: Path, config: Mapping[str, Any], family: Family, tensors: Mapping[str, torch.Tensor],
                   device: str) -> Any:
    """Write `model_dir` and build its pipeline there, the network holding exactly `tensors`."""
    import json

    config = copy.deepcopy(dict(config))
    if family.reads_weights_file:
        torch.save(dict(tensors), model_dir / WEIGHTS_FILE)
    elif isinstance(config.get("model"), dict):
        config["model"]["pretrained"] = False  # M2FP would torch.load (whole pickles) and skip misfits
    (model_dir / "configuration.json").write_text(json.dumps(config))
    if family.needs_mmcv:
        from worker.runtime import mmcv_compat

        mmcv_compat.install()
    built = pipeline(config["task"], model=str(model_dir.resolve()), device=device)
    network = family.network(built)
    network.load_state_dict(dict(tensors), strict=True)
    network.eval()
    return built


class ModelscopeBackend:
    def __init__(self, device: str, loader: ArtifactLoader | None = None) -> None:
        self.device = device
        self.loader = loader or ArtifactLoader()
        self._pipeline: Any = None
        self._manifest: Manifest | None = None
        self._labels: tuple[str, str | None] = ("", None)  # M2FP's background label, and its person label
        self._dir: Path | None = None
        # A modelscope pipeline keeps per-call state (its preprocessing and forward parameters,
        # the detector's predictor): serving and validation take turns.
        self._lock = threading.Lock()

    def load(self, artifact: Path, manifest: Manifest) -> None:
        if not artifact.is_file():
            raise BackendError(f"artifact {artifact} does not exist")
        self.loader.check(manifest, ("safetensors", "state-dict"))
        config, family = checked_configuration(manifest)
        tensors = self.loader.tensors(artifact, manifest)
        self._dir = Path(tempfile.mkdtemp(prefix="hotswap-modelscope-"))
        try:
            self._pipeline = build_pipeline(self._dir, config, family, tensors, self.device)
        except Exception as exc:  # an import, a missing op, a shape mismatch: the version is unusable here
            self.release()
            hint = "; install what it needs with  pip install 'hotswap[modelscope]'" if _import_failed(exc) else ""
            raise BackendError(f"modelscope could not load {artifact.name}: {_reason(exc)}{hint}") from exc
        finally:
            del tensors
        model: dict[str, Any] = config["model"] if isinstance(config.get("model"), dict) else {}
        labels = list(model.get("classes") or [""])
        person = labels[model["num_parsing"]] if model.get("parsing_on") and model.get("num_parsing") else None
        self._labels = (labels[0], person)
        self._manifest = manifest

    def warm_up(self) -> None:
        try:
            self.predict([blank_image(self._loaded_manifest().input_size)], InferenceParams())
        except BackendError:
            raise
        except Exception as exc:  # the first forward is where a missing op or a bad shape shows
            raise BackendError(f"modelscope's first forward failed: {_reason(exc)}") from exc

    def predict(self, images: Sequence[Image], params: InferenceParams) -> list[Prediction]:
        manifest = self._loaded_manifest()
        with self._lock:
            outputs = [self._pipeline(image) for image in images]
        if manifest.task == "face-detection":
            return [face_prediction(output, params) for output in outputs]
        background, person = self._labels
        return [parsing_prediction(output, manifest.classes, image.shape[:2], background, person)
                for output, image in zip(outputs, images, strict=True)]

    def release(self) -> None:
        self._pipeline = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _loaded_manifest(self) -> Manifest:
        if self._manifest is None or self._pipeline is None:
            raise BackendError("model is not loaded")
        return self._manifest


def _import_failed(exc: BaseException | None) -> bool:
    # modelscope imports a model's module lazily and wraps what failed in a RuntimeError.
    while exc is not None:
        if isinstance(exc, ImportError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    # modelscope's registry wraps constructor errors as "Pipeline: Model: message"; torch's
    # load_state_dict lists each mismatch on a line of its own: keep them, they are the reason.
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
