"""YOLO networks built from a manifest's declarative architecture, with weights that are only data.

The architecture is an ultralytics model config (the dict a model's yaml holds: layers as
`[from, repeats, module, args]`). ultralytics builds it with `parse_model`, which looks module
names up among its own globals (functions that load checkpoints among them) and `eval`s an
`activation` string, so a config is checked first: every layer names a model layer class from
`torch.nn` or `ultralytics.nn.modules`, and an activation is a `torch.nn` class called with
literal arguments. The weights go in with `load_state_dict(strict=True)`: every tensor the
network has, of its shape, and nothing else.

A pickled ultralytics checkpoint loads through `load_checkpoint` only via `ArtifactLoader.unpickled`
(the manifest says pickle, the worker opts in).

Building a network costs far more than its weights: ultralytics initialises every layer at random
and runs a forward pass to learn the strides (116 ms of CPU for yolov8n at 128 px, measured, against
32 ms to deep-copy a built one). So the first network of an architecture is kept as a template and
every later build of it is a copy whose weights the artifact then overwrites (`strict=True`: all
of them). Like the TorchScript templates (`tracing.py`), there is one per architecture a process
has served, never one per version: updates do not grow the worker.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.manifest import ArtifactFormat, Manifest
from worker.runtime.backend import BackendError
from worker.runtime.templates import Templates
from worker.runtime.weights import ArtifactLoader

if TYPE_CHECKING:
    from ultralytics import YOLO

#: An ultralytics `BaseModel` (a torch module with `yaml`, `stride`, `names`, `fuse`...); untyped.
Network = Any

SUPPORTED_FORMATS: tuple[ArtifactFormat, ...] = ("safetensors", "state-dict", "pickle")
#: Tasks YOLO serves here, with the network class for each and a packaged config of that task.
TASKS = {"detect": ("DetectionModel", "yolov8n.yaml"), "segment": ("SegmentationModel", "yolov8n-seg.yaml"),
         "pose": ("PoseModel", "yolov8n-pose.yaml"), "classify": ("ClassificationModel", "yolov8n-cls.yaml")}
#: Layer classes that reach beyond the config: TorchVision builds a torchvision model and fetches
#: its pretrained weights.
_FORBIDDEN_LAYERS = frozenset({"TorchVision"})
_LAYER_MODULES = ("torch.nn.modules.", "ultralytics.nn.modules.")


def load_network(artifact: Path, manifest: Manifest, loader: ArtifactLoader) -> Network:
    """The version's network in eval mode, on the CPU, from weights and config (or, opted in, a pickle)."""
    loader.check(manifest, SUPPORTED_FORMATS)  # before the artifact is parsed
    if manifest.task not in TASKS:
        raise BackendError(f"ultralytics serves {', '.join(TASKS)} here, not {manifest.task}")
    if manifest.format == "pickle":
        network = loader.unpickled(artifact, manifest, _unpickle)
        task = str(getattr(network, "task", ""))
        if task != manifest.task:
            raise BackendError(f"artifact is a {task} model, manifest says {manifest.task}")
        return network
    assert manifest.architecture is not None  # Manifest requires it with weights
    network = build_network(manifest.architecture, manifest.task)
    tensors = loader.tensors(artifact, manifest)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # names or shapes that are not this architecture's
        raise BackendError(f"the weights do not fit the manifest's architecture: {exc}") from exc
    return network.eval()


_templates: Templates[Network] = Templates()


def build_network(architecture: dict[str, Any], task: str) -> Network:
    """A network of `architecture` (checked first), for `task`, its weights not yet its own: a copy
    of this architecture's template, built the first time it is asked for."""
    from ultralytics.nn import tasks

    check_architecture(architecture)
    if tasks.guess_model_task(architecture) != task:
        raise BackendError(f"the architecture's head is not a {task} head")

    def build() -> Network:
        # parse_model writes into the config it is given: the manifest's stays as it was.
        network = getattr(tasks, TASKS[task][0])(copy.deepcopy(architecture), verbose=False)
        network.task = task
        return network

    return _templates.copy_of([architecture, task], build)


def yolo_around(network: Network, manifest: Manifest) -> YOLO:
    """A `YOLO` (for `YOLO.predict`) serving `network`, nothing unpickled, nothing fetched.

    YOLO() takes a path or a name only: a checkpoint path unpickles, a missing one asks GitHub for
    release assets. A packaged config of the task builds a small network from ultralytics' own
    files, whose place the version's network then takes.
    """
    from ultralytics import YOLO

    yolo = YOLO(TASKS[manifest.task][1], task=manifest.task)
    network.names = dict(manifest.classes)
    network.args = yolo.model.args
    yolo.model = network
    return yolo


def check_architecture(architecture: dict[str, Any]) -> None:
    """Refuse a config that would make ultralytics do more than build layers from literals."""
    layers = architecture.get("backbone"), architecture.get("head")
    if not all(isinstance(part, list) for part in layers):
        raise BackendError("the architecture needs 'backbone' and 'head' lists of layers")
    for row in [*layers[0], *layers[1]]:  # type: ignore[misc]
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[2], str) and isinstance(row[3], list)):
            raise BackendError(f"an architecture layer is [from, repeats, module, args], not {row!r}")
        _check_layer(row[2])
    activation = architecture.get("activation")
    if activation is not None:
        _check_activation(activation)


def _check_layer(name: str) -> None:
    import torch
    from ultralytics.nn import tasks

    layer = getattr(torch.nn, name[3:], None) if name.startswith("nn.") else vars(tasks).get(name)
    permitted = (isinstance(layer, type) and issubclass(layer, torch.nn.Module)
                 and layer.__module__.startswith(_LAYER_MODULES) and name not in _FORBIDDEN_LAYERS)
    if not permitted:
        raise BackendError(f"architecture layer {name!r} is not a permitted model layer")


def _check_activation(activation: object) -> None:
    import torch

    try:
        call = ast.parse(str(activation), mode="eval").body
    except SyntaxError:
        call = None
    literals = isinstance(call, ast.Call) and all(
        isinstance(a, ast.Constant) for a in [*call.args, *(k.value for k in call.keywords)]
    )
    func = call.func if isinstance(call, ast.Call) else None
    layer = getattr(torch.nn, func.attr, None) if isinstance(func, ast.Attribute) else None
    permitted = (literals and isinstance(func, ast.Attribute) and ast.unparse(func.value) in ("nn", "torch.nn")
                 and isinstance(layer, type) and issubclass(layer, torch.nn.Module))
    if not permitted:
        raise BackendError(f"architecture activation {activation!r} is not nn.<Layer>(literals)")


def _unpickle(artifact: Path) -> Network:
    from ultralytics.nn.tasks import load_checkpoint

    network, _ = load_checkpoint(str(artifact))
    return network
