"""Demo zoo: `faces-mtcnn`, MTCNN with its published weights, the zoo's one face model that finds real faces.

facenet-pytorch's wheel ships the three networks' state dicts as package data
(`facenet_pytorch/data/{pnet,rnet,onet}.pt`). They are read here, at build time, with
`torch.load(weights_only=True)` and written as one safetensors file (`pnet.*`, `rnet.*`, `onet.*`):
the worker reads safetensors, never a pickle, and the build downloads nothing. The version's
calibration is the two photos ultralytics ships, expecting the faces (box and five landmarks) the
version itself found at build time (golden outputs).

facenet-pytorch is not a declared dependency: its wheel pins torch<2.3 and numpy<2, which pip
would resolve by downgrading this project's torch. It is installed with `--no-deps` (the
Makefile's setup does it); without it this model is skipped, saying so, and the rest of the zoo builds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control.zoo import CREATED_AT, Progress, _locked, _publish, _scratch
from schemas.jobs import InferenceParams
from schemas.manifest import Calibration, CalibrationImage, ExpectedObject, Manifest
from schemas.outputs import FACE_LANDMARKS
from worker.runtime.repository import sha256_of

if TYPE_CHECKING:
    import torch

    from worker.runtime.predictions import Prediction

MODEL, VERSION = "faces-mtcnn", "1.0.0"
ARTIFACT = "model.safetensors"
GENERATOR = 1  # bump when the calibration or the conversion changes: built versions then count as stale
PACKAGE, PACKAGE_VERSION = "facenet-pytorch", "2.6.0"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
NETWORKS = ("pnet", "rnet", "onet")
#: facenet-pytorch's MTCNN defaults, as its documentation and the original paper's code use them.
ARCHITECTURE: dict[str, Any] = {"kind": "mtcnn", "min_face_size": 20, "thresholds": [0.6, 0.7, 0.7], "factor": 0.709}
PHOTOS = ("bus.jpg", "zidane.jpg")
#: The warm-up frame's side: MTCNN takes any size; 640 is a typical camera frame's width.
INPUT_SIZE = 640


def source_files() -> dict[str, bytes]:
    """The wheel's state dicts by network, as bytes (package data: it may sit in a zip)."""
    data = files("facenet_pytorch").joinpath("data")
    return {name: data.joinpath(f"{name}.pt").read_bytes() for name in NETWORKS}


def weights(sources: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """The three networks' tensors under one namespace each, as the backend loads them."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, raw in sources.items():
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        tensors.update({f"{name}.{key}": value.contiguous() for key, value in state.items()})
    return tensors


def _lineage(sources: dict[str, bytes]) -> dict[str, Any]:
    return {"generator": GENERATOR, "architecture": ARCHITECTURE,
            "source": {"package": f"{PACKAGE}=={PACKAGE_VERSION}",
                       "files": {f"facenet_pytorch/data/{name}.pt": hashlib.sha256(raw).hexdigest()
                                 for name, raw in sources.items()}}}


def _manifest(directory: Path, calibration: Calibration | None, lineage: dict[str, Any]) -> Manifest:
    return Manifest(
        name=MODEL, version=VERSION, backend="mtcnn", task="face-detection", artifact=ARTIFACT,
        format="safetensors", architecture=ARCHITECTURE, sha256=sha256_of(directory / ARTIFACT),
        classes={0: "face"}, keypoints=list(FACE_LANDMARKS),
        requires=[f"{PACKAGE}=={PACKAGE_VERSION}", "torch>=2.6"], input_size=INPUT_SIZE,
        calibration=calibration, created_at=CREATED_AT,
        lineage={**lineage, "built_with": {"torch": installed_version("torch")}},
    )  # fmt: skip


def golden(prediction: Prediction) -> list[ExpectedObject]:
    """What the version found on a photo, box and landmarks, as calibration expectations."""
    if prediction.keypoints is None:
        raise RuntimeError("MTCNN answered faces without landmarks")
    return [ExpectedObject(class_name="face", box=tuple(float(v) for v in box),
                           keypoints=[(float(x), float(y), float(v)) for x, y, v in points])
            for box, points in zip(prediction.boxes, prediction.keypoints, strict=True)]


def _write_version(final: Path, sources: dict[str, bytes], say: Progress) -> None:
    import ultralytics
    from safetensors.torch import save_file

    from worker.runtime.images import ImageLimits, decode_image
    from worker.runtime.mtcnn_backend import MtcnnBackend

    tmp = _scratch(final.parent, f".tmp-{VERSION}-")
    save_file(weights(sources), tmp / ARTIFACT)
    (tmp / ARTIFACT).chmod(0o644)  # safetensors writes owner-only; workers may run as another user
    lineage = _lineage(sources)
    (tmp / "calibration").mkdir()
    assets = Path(ultralytics.__file__).parent / "assets"
    names = [f"calibration/{photo}" for photo in PHOTOS]
    for photo, name in zip(PHOTOS, names, strict=True):
        shutil.copyfile(assets / photo, tmp / name)
    # Through the worker's own backend and image decoding: the answers validation will compare.
    backend = MtcnnBackend("cpu")
    backend.load(tmp / ARTIFACT, _manifest(tmp, None, lineage))
    limits = ImageLimits(max_bytes=50 * 1024 * 1024, max_pixels=100_000_000)
    answers = backend.predict([decode_image((tmp / n).read_bytes(), limits) for n in names], InferenceParams(conf=0.25))
    backend.release()
    items = [CalibrationImage(file=n, expected=golden(p)) for n, p in zip(names, answers, strict=True)]
    if not any(item.expected for item in items):
        raise RuntimeError(f"{MODEL} {VERSION} finds no face on {', '.join(PHOTOS)}: the weights are not MTCNN's")
    calibration = Calibration(images=items, min_recall=0.9, match_iou=0.5, conf=0.25)
    counts = ", ".join(f"{len(answer)} on {photo}" for answer, photo in zip(answers, PHOTOS, strict=True))
    say(f"{MODEL} {VERSION}: golden faces {counts}")
    (tmp / "manifest.json").write_text(_manifest(tmp, calibration, lineage).model_dump_json(indent=2) + "\n")
    _publish(tmp, final)


def is_complete(version_dir: Path, sources: dict[str, bytes]) -> bool:
    """Built = the manifest parses, pins the artifact beside it and came from these weights, this way."""
    try:
        manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
        expected = _lineage(sources)
        if any(manifest.lineage.get(key) != value for key, value in expected.items()):
            return False
        return sha256_of(version_dir / manifest.artifact) == manifest.sha256
    except (OSError, ValueError):
        return False


def missing_package() -> str | None:
    """Why this model cannot be built here, or None."""
    try:
        found = installed_version(PACKAGE) if importlib.util.find_spec("facenet_pytorch") else None
    except PackageNotFoundError:
        found = None
    if found is None:
        return f"{PACKAGE} is not installed; install it with  {INSTALL}  (--no-deps: its pins are older than our torch)"
    if found != PACKAGE_VERSION:
        return f"{PACKAGE} {found} is installed, the model pins {PACKAGE_VERSION}; install it with  {INSTALL}"
    return None


def build_mtcnn(root: Path, *, force: bool = False, progress: Progress | None = None) -> list[Path]:
    """Build `faces-mtcnn` 1.0.0 unless built; returns its directory, or nothing when it cannot be built here."""
    say: Callable[[str], None] = progress or (lambda _message: None)
    why = missing_package()
    if why is not None:
        say(f"SKIPPED {MODEL} (MTCNN, real face weights): {why}")
        return []
    root = root.resolve()
    final = root / MODEL / VERSION
    sources = source_files()
    with _locked(root / ".mtcnn"):  # not the shapes lock: build_zoo may hold that one
        for leftover in final.parent.glob(f".tmp-{VERSION}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if force or not is_complete(final, sources):
            say(f"building {MODEL} {VERSION} (MTCNN, published weights from {PACKAGE} {PACKAGE_VERSION})")
            _write_version(final, sources, say)
            say(f"built {final} ({(final / ARTIFACT).stat().st_size / 1e6:.1f} MB)")
    return [final]
