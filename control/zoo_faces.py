"""Demo zoo for the modelscope families: face detectors and a human parser, built offline.

Nothing downloads weights here, so these are the real modelscope architectures with seeded random
weights, their classification heads biased so that they answer something, deterministically:
random weights detect nothing, and a model that finds nothing cannot show a swap. Written as
`<root>/<model>/<version>/` (model.safetensors, manifest.json with modelscope's configuration.json
as the architecture, calibration/):

- `faces` (ULFD, 1 MB): 1.0.0 and 2.0.0, other seeds and biases, so they answer differently; and
  0.9.0-broken, whose classification head has the shape of another layout (three classes, as a
  library release that changed the head would lay it out), so loading it fails.
- with `large`: `mogface` (MogFace, ResNet-152 based, ~342 MB) and `parsing` (M2FP, ~253 MB), 1.0.0 each.

Each good version's calibration expects what the version itself answered at build time on a few
images (golden outputs): an environment that no longer reproduces them refuses the version.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from control.zoo import CREATED_AT, Progress, _locked, _publish, _scratch
from schemas.jobs import InferenceParams
from schemas.manifest import Calibration, CalibrationImage, ExpectedObject, Manifest
from worker.runtime.repository import sha256_of

if TYPE_CHECKING:
    import torch

    from worker.runtime.predictions import Prediction

ARTIFACT = "model.safetensors"
GENERATOR = 2  # bump when the calibration images or the way heads are biased change
REQUIRES = ["modelscope>=1.40", "torch>=2.6"]
ULFD, MOGFACE, M2FP = ("manual-face-detection-ulfd", "resnet101-face-detection-cvpr22papermogface",
                       "m2fp-image-human-parsing")
NOISE_SEED = 7


@dataclass(frozen=True)
class Recipe:
    model: str
    version: str
    pipeline: str
    seed: int
    bias: float  # added to the face (or each part's) logit, taken from the background's
    broken: bool = False
    large: bool = False
    #: Calibration photos scaled to this longest side: MogFace takes ~40 s on bus.jpg at full size
    #: (one CPU thread), ~4 s at 320 px; validation runs every image several times.
    calibration_side: int | None = None
    #: The warm-up frame's side (and the latency probe's without calibration images): ULFD and M2FP
    #: resize to 640 and 512 themselves; MogFace takes any size, at ~20 s for 640 × 640.
    input_size: int = 640


RECIPES: tuple[Recipe, ...] = (
    Recipe("faces", "1.0.0", ULFD, seed=1, bias=1.5),
    Recipe("faces", "2.0.0", ULFD, seed=2, bias=2.0),
    Recipe("faces", "0.9.0-broken", ULFD, seed=1, bias=1.5, broken=True),
    # Random MogFace scores sit just under its fixed 0.82 threshold: a small push passes a few dozen
    # anchors per image (bias 0: none, 1.1: the 750 it keeps at most).
    Recipe("mogface", "1.0.0", MOGFACE, seed=3, bias=0.8, large=True, calibration_side=320,
           input_size=320),
    Recipe("parsing", "1.0.0", M2FP, seed=4, bias=2.0, large=True, calibration_side=320, input_size=512),
)

#: M2FP's single-person parser on the 20 LIP labels, ResNet-101 (DeepLab stem) backbone.
LIP_LABELS = ["Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants",
              "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe",
              "Right-shoe"]
M2FP_MODEL: dict[str, Any] = {
    "type": "m2fp",
    "backbone": {"out_features": ["res2", "res3", "res4", "res5"], "depth": 101, "num_groups": 1,
                 "width_per_group": 64, "norm": "BN", "stem_out_channels": 128, "res2_out_channels": 256,
                 "stride_in_1x1": False, "res4_dilation": 1, "res5_dilation": 1, "res5_multi_grid": [1, 2, 4]},
    "encoder": {"in_features": ["res3", "res4", "res5"], "conv_dim": 256, "mask_dim": 256,
                "transformer_dropout": 0.0, "transformer_nheads": 8, "transformer_dim_feedforward": 1024,
                "transformer_enc_layers": 6, "transformer_in_features": ["res3", "res4", "res5"],
                "common_stride": 4},
    "decoder": {"mask_classification": True, "num_classes": len(LIP_LABELS), "hidden_dim": 256,
                "num_queries": 100, "nheads": 8, "dim_feedforward": 2048, "dec_layers": 9, "pre_norm": False,
                "enforce_input_project": False, "mask_dim": 256},
    "input_single_human": {"sizes": [[512, 512]]},
    "classes": LIP_LABELS,
    "single_human": True,
    "sem_seg_postprocess_before_inference": False,  # True leaves the semantic map out of the answer
    "pretrained": False,
}


def configuration(recipe: Recipe) -> dict[str, Any]:
    """modelscope's configuration.json for the recipe: the manifest's architecture."""
    if recipe.pipeline == M2FP:
        return {"framework": "pytorch", "task": "image-segmentation", "pipeline": {"type": M2FP},
                "model": json.loads(json.dumps(M2FP_MODEL))}
    return {"framework": "pytorch", "task": "face-detection", "pipeline": {"type": recipe.pipeline}}


def weights(recipe: Recipe) -> dict[str, torch.Tensor]:
    """The recipe's network, seeded, its head biased; the broken recipe's head reshaped."""
    import torch

    torch.manual_seed(recipe.seed)
    network, heads = _network(recipe)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in network.state_dict().items()}
    for name, classes in heads:
        bias = state[name].view(-1, classes)  # per anchor or query: background first (M2FP: last is "no object")
        if recipe.pipeline == M2FP:
            bias[:, 1:-1] += recipe.bias
        elif classes == 1:  # MogFace: one face logit, through a sigmoid
            bias += recipe.bias
        else:
            bias[:, 1] += recipe.bias
            bias[:, 0] -= recipe.bias
    if recipe.pipeline == M2FP:
        # Random decoder layers make every query alike (all pick one part, everywhere). With their
        # attention and feed-forward outputs zeroed, each query keeps its own embedding: queries
        # prefer different parts, and their masks (query × pixel features) follow the image.
        for name in state:
            if name.startswith("sem_seg_head.predictor.transformer_") and ("out_proj" in name or "linear2" in name):
                state[name].zero_()
    if recipe.broken:
        name = heads[-1][0].replace(".bias", ".weight")
        anchors = state[name].shape[0] // 2
        state[name] = torch.zeros((anchors * 3, *state[name].shape[1:]))
    return state


def _network(recipe: Recipe) -> tuple[torch.nn.Module, list[tuple[str, int]]]:
    if recipe.pipeline == ULFD:
        from modelscope.models.cv.face_detection.ulfd_slim.vision.ssd.mb_tiny_fd import create_mb_tiny_fd

        # The coarsest head only: a few dozen faces per image rather than thousands.
        return create_mb_tiny_fd(2, is_test=True, device="cpu"), [("classification_headers.3.bias", 2)]
    if recipe.pipeline == MOGFACE:
        from modelscope.models.cv.face_detection.mogface.models.mogface import MogFace

        return MogFace(), [("pred_net.pred_cls.bias", 1)]
    from worker.runtime import mmcv_compat

    mmcv_compat.install()
    from modelscope.models.cv.image_human_parsing import M2FP as M2FPModel

    model = {k: v for k, v in configuration(recipe)["model"].items() if k != "type"}
    network = M2FPModel("/nonexistent", **model)
    heads = [(n, len(LIP_LABELS) + 1) for n, _ in network.named_parameters() if n.endswith("class_embed.bias")]
    return network, heads


def calibration_images(directory: Path, side: int | None = None) -> list[str]:
    """The two photos ultralytics ships (scaled to `side`, as PNG), a grey frame and seeded noise;
    file names relative to `directory`."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    (directory / "calibration").mkdir(parents=True, exist_ok=True)
    files = []
    for photo in ("bus.jpg", "zidane.jpg"):
        if side is None:
            shutil.copyfile(assets / photo, directory / "calibration" / photo)
            files.append(f"calibration/{photo}")
            continue
        image = cv2.imread(str(assets / photo))
        if image is None:
            raise FileNotFoundError(f"ultralytics ships no readable {photo}")
        scale = side / max(image.shape[:2])
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        name = f"calibration/{Path(photo).stem}.png"
        cv2.imwrite(str(directory / name), small)
        files.append(name)
    h, w = (480, 640) if side is None else (side * 3 // 4, side)
    noise = np.random.default_rng(NOISE_SEED).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for name, image in (("blank.png", np.full((h, w, 3), 114, np.uint8)), ("noise.png", noise)):
        cv2.imwrite(str(directory / "calibration" / name), image)
        files.append(f"calibration/{name}")
    return files


def expected(prediction: Prediction, manifest: Manifest, shape: tuple[int, int]) -> list[ExpectedObject]:
    """What a version answered, as calibration expectations: faces by box, parts by mask."""
    if manifest.task == "human-parsing":
        from worker.runtime.masks import encode_masks

        parts = prediction.parts
        if parts is None:
            return []
        rles = encode_masks(parts.masks)
        return [ExpectedObject(class_name=manifest.classes[int(c)], mask=rle)
                for c, rle in zip(parts.class_ids, rles, strict=True)]
    return [ExpectedObject(class_name="face", box=tuple(float(v) for v in box)) for box in prediction.boxes]


def _manifest(recipe: Recipe, directory: Path, calibration: Calibration | None) -> Manifest:
    parsing = recipe.pipeline == M2FP
    return Manifest(
        name=recipe.model, version=recipe.version, backend="modelscope",
        task="human-parsing" if parsing else "face-detection", artifact=ARTIFACT, format="safetensors",
        architecture=configuration(recipe), sha256=sha256_of(directory / ARTIFACT),
        classes=dict(enumerate(LIP_LABELS[1:], start=1)) if parsing else {0: "face"},
        requires=REQUIRES + (["timm"] if parsing else []),
        input_size=recipe.input_size, calibration=calibration, created_at=CREATED_AT,
        lineage={"generator": GENERATOR, "recipe": _recipe(recipe),
                 "built_with": {name: installed_version(name) for name in ("modelscope", "torch")}},
    )  # fmt: skip


def _recipe(recipe: Recipe) -> dict[str, Any]:
    return {k: v for k, v in asdict(recipe).items() if k not in ("model", "version")}


def _write_version(recipe: Recipe, final: Path, say: Progress) -> None:
    from safetensors.torch import save_file

    from worker.runtime.images import ImageLimits, decode_image
    from worker.runtime.modelscope_backend import ModelscopeBackend

    tmp = _scratch(final.parent, f".tmp-{recipe.version}-")
    save_file(weights(recipe), tmp / ARTIFACT)
    (tmp / ARTIFACT).chmod(0o644)  # safetensors writes owner-only; workers may run as another user
    manifest = _manifest(recipe, tmp, None)
    calibration = None
    if not recipe.broken:
        files = calibration_images(tmp, recipe.calibration_side)
        # Through the worker's own backend and image decoding: the answers validation will compare.
        backend = ModelscopeBackend("cpu")
        backend.load(tmp / ARTIFACT, manifest)
        limits = ImageLimits(max_bytes=50 * 1024 * 1024, max_pixels=100_000_000)
        images = [decode_image((tmp / f).read_bytes(), limits) for f in files]
        answers = backend.predict(images, InferenceParams(conf=0.25))
        backend.release()
        items = [CalibrationImage(file=f, expected=expected(p, manifest, i.shape[:2]))
                 for f, p, i in zip(files, answers, images, strict=True)]
        if not any(item.expected for item in items):
            raise RuntimeError(f"{recipe.model} {recipe.version} answers nothing on its calibration images")
        calibration = Calibration(images=items, min_recall=0.9, match_iou=0.5, conf=0.25)
        say(f"{recipe.model} {recipe.version}: {sum(len(i.expected) for i in items)} golden objects "
            f"on {len(items)} images")
    (tmp / "manifest.json").write_text(_manifest(recipe, tmp, calibration).model_dump_json(indent=2) + "\n")
    _publish(tmp, final)


def is_complete(version_dir: Path, recipe: Recipe) -> bool:
    """Built = the manifest parses, pins the artifact beside it and was written by this recipe."""
    try:
        manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
        if manifest.lineage.get("generator") != GENERATOR or manifest.lineage.get("recipe") != _recipe(recipe):
            return False
        return sha256_of(version_dir / manifest.artifact) == manifest.sha256
    except (OSError, ValueError):
        return False


def build_faces(root: Path, *, force: bool = False, progress: Progress | None = None,
                large: bool = False) -> list[Path]:
    """Build the missing face and parsing versions (with `large`, the big ones too); returns their directories."""
    say: Callable[[str], None] = progress or (lambda _message: None)
    if importlib.util.find_spec("modelscope") is None:
        say("modelscope is not installed: no face or parsing models (pip install 'hotswap[modelscope]')")
        return []
    # Imported first: it keeps modelscope offline before the model classes below import modelscope.
    import worker.runtime.modelscope_backend  # noqa: F401

    root = root.resolve()
    recipes = [r for r in RECIPES if large or not r.large]
    finals = [root / r.model / r.version for r in recipes]
    with _locked(root / ".faces"):  # not the shapes lock: build_zoo may hold that one
        for recipe, final in zip(recipes, finals, strict=True):
            for leftover in final.parent.glob(f".tmp-{recipe.version}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if force or not is_complete(final, recipe):
                say(f"building {recipe.model} {recipe.version} ({recipe.pipeline}, seeded random weights)")
                _write_version(recipe, final, say)
                say(f"built {final} ({(final / ARTIFACT).stat().st_size / 1e6:.1f} MB)")
    return finals
