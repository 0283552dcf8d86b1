"""Reading artifacts without running their code: the one loader every backend goes through.

Peers run what they serve (TorchServe a `.mar`'s handler, Triton's PyTorch backend unpickles),
so a signed but compromised artifact owns the worker. Here an artifact is data (invariant 6):

- `safetensors`: a JSON header and raw tensors; nothing in the file can execute.
- `state-dict`: a `torch.save`d mapping of names to tensors, read with `torch.load(weights_only=True)`,
  whose unpickler builds tensors and plain containers only and refuses every other global.
- `json`: a backend's declarative spec, parsed as JSON.
- `pickle`: a pickled checkpoint, which is code. Loaded only when the manifest says so and the
  worker opts in (`HOTSWAP_ALLOW_PICKLE`); the check comes before it is parsed.

The architecture of a weights artifact comes from the manifest's declarative config, built by the
backend from its own code. The format is the manifest's word, not the file's: a file that is not
what its manifest says fails to parse as that format and is refused, never read another way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from schemas.manifest import WEIGHTS_FORMATS, ArtifactFormat, Manifest
from worker.runtime.backend import BackendError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
PICKLE: tuple[ArtifactFormat, ...] = ("pickle",)
JSON: tuple[ArtifactFormat, ...] = ("json",)


class PickleRefused(BackendError):
    """A pickled artifact on a worker that does not allow pickles."""


@dataclass(frozen=True)
class ArtifactLoader:
    allow_pickle: bool = False

    def check(self, manifest: Manifest, supported: Collection[ArtifactFormat]) -> None:
        """Before anything is read: the backend knows the format, and a pickle is allowed here."""
        if manifest.format not in supported:
            known = ", ".join(sorted(supported))
            raise BackendError(f"the {manifest.backend} backend does not load {manifest.format} artifacts ({known})")
        if manifest.format == "pickle" and not self.allow_pickle:
            raise PickleRefused(
                f"{manifest.artifact} is a pickled checkpoint (format pickle): unpickling runs code, and this "
                "worker does not allow pickles (HOTSWAP_ALLOW_PICKLE); serve it as safetensors"
            )

    def tensors(self, artifact: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
        """The named tensors of a weights artifact, on the CPU."""
        self.check(manifest, WEIGHTS_FORMATS)
        try:
            tensors = _safetensors(artifact) if manifest.format == "safetensors" else _state_dict(artifact)
        except Exception as exc:  # the format's own parser refused the bytes: nothing else reads them
            raise BackendError(f"{artifact.name} is not a valid {manifest.format} file: {_reason(exc)}") from exc
        return tensors

    def unpickled(self, artifact: Path, manifest: Manifest, unpickle: Callable[[Path], T]) -> T:
        """`unpickle(artifact)`, once the manifest says pickle and this worker allows it."""
        self.check(manifest, PICKLE)
        return unpickle(artifact)

    def json(self, artifact: Path, manifest: Manifest, max_bytes: int) -> Any:
        self.check(manifest, JSON)
        if artifact.stat().st_size > max_bytes:
            raise BackendError(f"{artifact.name} is over {max_bytes} bytes")
        try:
            return json.loads(artifact.read_bytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise BackendError(f"{artifact.name} is not JSON: {exc}") from exc


def _reason(exc: Exception) -> str:
    # torch's weights-only refusal is a page of advice (ending in "weights_only=False", the very thing
    # not to do), in terminal colours: its one informative line, the global it refused, is enough.
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    refused = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    return (refused or [line for line in lines if line] or [type(exc).__name__])[0]


def _safetensors(artifact: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(artifact, device="cpu")


def _state_dict(artifact: Path) -> dict[str, torch.Tensor]:
    import torch

    loaded = torch.load(artifact, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ValueError("a state dict maps names to tensors, and this is something else")
    return dict(loaded)
