"""The model repository on disk: `<root>/<model>/<version>/{manifest.json, artifact}`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from packaging.version import InvalidVersion, Version
from pydantic import ValidationError

from schemas.manifest import MODEL_NAME_PATTERN, VERSION_PATTERN, Manifest


class RepositoryError(Exception):
    """A model or version that cannot be used, with a reason fit for an operator."""


@dataclass(frozen=True)
class VersionDir:
    manifest: Manifest
    path: Path

    @property
    def artifact(self) -> Path:
        return self.path / self.manifest.artifact


def copy_at_most(source: IO[bytes], out: IO[bytes], max_bytes: int, what: str) -> None:
    """Copy a download in chunks, refusing it once it passes `max_bytes` (a source or peer that
    never stops sending must not fill the disk)."""
    copied = 0
    while chunk := source.read(1 << 20):
        copied += len(chunk)
        if copied > max_bytes:
            raise RepositoryError(f"{what} is over {max_bytes} bytes")
        out.write(chunk)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def release_key(version: str) -> tuple[tuple[int, ...], int, Any]:
    """Sort key: PEP 440 order (`2.0.0rc1` < `2.0.0rc2` < `2.0.0` < `2.0.0.post1`); a name PEP 440
    does not parse (`0.9.0-bad`) sorts as a labelled build just below the release of its numbers."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        core, _, label = version.partition("-")
        return (_trimmed(int(n) for n in re.findall(r"\d+", core)), 0, label)
    return (_trimmed(parsed.release), 1, parsed)


def is_release(version: str) -> bool:
    """A final release: not a pre-release, a development build or a labelled build."""
    try:
        return not Version(version).is_prerelease
    except InvalidVersion:
        return False


def _trimmed(numbers: Iterable[int]) -> tuple[int, ...]:
    """`1.0` and `1.0.0` are one release."""
    release = list(numbers)
    while release and release[-1] == 0:
        release.pop()
    return tuple(release)


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and re.match(MODEL_NAME_PATTERN, p.name)
        )

    def versions(self, model: str) -> list[str]:
        """Versions with a manifest, oldest release first."""
        model_dir = self._model_dir(model)
        found = [p.name for p in model_dir.iterdir() if (p / "manifest.json").is_file()]
        return sorted(found, key=release_key)

    def latest(self, model: str) -> str:
        versions = [v for v in self.versions(model) if is_release(v)] or self.versions(model)
        if not versions:
            raise RepositoryError(f"model {model!r} has no versions under {self.root}")
        return versions[-1]

    def get(self, model: str, version: str) -> VersionDir:
        if not re.match(VERSION_PATTERN, version):
            raise RepositoryError(f"invalid version name {version!r}")
        path = self._model_dir(model) / version
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise RepositoryError(f"{model}/{version} not found in the repository {self.root}")
        try:
            manifest = Manifest.model_validate_json(manifest_file.read_bytes())
        except ValidationError as exc:
            raise RepositoryError(f"{model}/{version}: invalid manifest.json: {exc}") from exc
        if (manifest.name, manifest.version) != (model, version):
            raise RepositoryError(
                f"{model}/{version}: manifest names {manifest.name}/{manifest.version}"
            )
        return VersionDir(manifest, path)

    def verified_artifact(self, entry: VersionDir) -> Path:
        """The artifact path, once it exists and matches the manifest's sha256."""
        artifact = entry.artifact
        if not artifact.is_file():
            raise RepositoryError(f"artifact {artifact} is missing")
        actual = sha256_of(artifact)
        if actual != entry.manifest.sha256:
            raise RepositoryError(
                f"artifact {artifact.name} sha256 {actual[:12]}… does not match the manifest's "
                f"{entry.manifest.sha256[:12]}…"
            )
        return artifact

    def _model_dir(self, model: str) -> Path:
        if not re.match(MODEL_NAME_PATTERN, model):
            raise RepositoryError(f"invalid model name {model!r}")
        path = self.root / model
        if not path.is_dir():
            raise RepositoryError(f"model {model!r} not found in the repository {self.root}")
        return path
