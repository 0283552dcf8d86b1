"""Versions of `shapes` derived from 2.0.0 without training, for rollouts (`hotswap rollout`):

- `2.0.1`: 2.0.0's weights under another name, the same answers: an A/A rollout, which must never
  abort.
- `2.1.0-drift`: 2.0.0 that never answers `triangle` (that class's logits pushed to -30 in every
  scale of the detect head), standing in for a version trained without one class: it still
  passes validation (recall on the calibration images stays above the manifest's minimum), but
  its answers differ from 2.0.0's, which the rollout's agreement gate must catch.

Rebuilt when 2.0.0 changes (its sha256 is in their lineage); cheap: no training.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from control import zoo
from schemas.manifest import Manifest
from worker.runtime.repository import sha256_of

PARENT = "2.0.0"
DROPPED_CLASS = "triangle"
#: The detect head's last convolution per scale: one logit bias per class.
_CLASS_BIASES = tuple(f"model.22.cv3.{scale}.2.bias" for scale in range(3))


@dataclass(frozen=True)
class Variant:
    version: str
    derivation: str
    #: Edits the parent's tensors in place; None: the parent's artifact, byte for byte.
    change: Callable[[dict[str, np.ndarray], dict[int, str]], None] | None


def _without_dropped_class(tensors: dict[str, np.ndarray], classes: dict[int, str]) -> None:
    index = next(i for i, name in classes.items() if name == DROPPED_CLASS)
    for key in _CLASS_BIASES:
        tensors[key][index] = -30.0


VARIANTS = (
    Variant("2.0.1", f"{PARENT}'s weights unchanged, under another name (an A/A rollout)", None),
    Variant("2.1.0-drift", f"{PARENT} with the {DROPPED_CLASS!r} logits at -30: never answers {DROPPED_CLASS}",
            _without_dropped_class),
)


def build_variants(root: Path, *, force: bool = False, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Build the variants missing or stale; returns their directories."""
    say = progress or (lambda _message: None)
    parent = root / zoo.MODEL_NAME / PARENT
    finals = [root / zoo.MODEL_NAME / v.version for v in VARIANTS]
    with zoo._locked(root):
        parent_sha = sha256_of(parent / zoo.ARTIFACT)
        for variant, final in zip(VARIANTS, finals, strict=True):
            if force or not _is_current(final, parent_sha):
                _write(variant, parent, parent_sha, final)
                say(f"built {final} ({variant.derivation})")
    return finals


def _is_current(final: Path, parent_sha: str) -> bool:
    try:
        manifest = Manifest.model_validate_json((final / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.lineage.get("parent_sha256") == parent_sha and zoo.is_complete(final)


def _write(variant: Variant, parent: Path, parent_sha: str, final: Path) -> None:
    manifest = Manifest.model_validate_json((parent / "manifest.json").read_text())
    tmp = zoo._scratch(final.parent, f".tmp-{variant.version}-")
    shutil.copytree(parent / "calibration", tmp / "calibration")
    if variant.change is None:
        shutil.copyfile(parent / zoo.ARTIFACT, tmp / zoo.ARTIFACT)
    else:
        tensors = load_file(str(parent / zoo.ARTIFACT))
        variant.change(tensors, manifest.classes)
        save_file(tensors, str(tmp / zoo.ARTIFACT))
    lineage = {"parent": PARENT, "parent_sha256": parent_sha, "derived": variant.derivation}
    derived = manifest.model_copy(update={"version": variant.version, "sha256": sha256_of(tmp / zoo.ARTIFACT),
                                          "lineage": lineage})
    (tmp / "manifest.json").write_text(derived.model_dump_json(indent=2) + "\n")
    zoo._publish(tmp, final)
