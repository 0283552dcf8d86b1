"""Artifacts by URI: fetched into a content-addressed local cache, verified, then loaded.

An update may name its artifact by `file://` or `http(s)://` URI (workers on other machines
than the repository fetch them). The manifest is the `manifest.json` beside the artifact. Only
URIs under an allowed prefix are fetched (invariant 6), and a cached copy is used only while its
sha256 matches the command's and the manifest's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from urllib.error import URLError
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from schemas.control import ArtifactRef
from schemas.manifest import Manifest
from worker.runtime.repository import RepositoryError, VersionDir, sha256_of

MAX_ARTIFACT_BYTES = 4 * 1024**3


class ArtifactCache:
    def __init__(self, root: Path, allowed_prefixes: list[str], timeout_s: float = 60.0) -> None:
        self.root = root
        self.allowed_prefixes = allowed_prefixes
        self.timeout_s = timeout_s

    def fetch(self, model: str, version: str, ref: ArtifactRef) -> VersionDir:
        """Blocking: the cached version directory for `ref`, fetched first if needed."""
        if not any(ref.uri.startswith(prefix) for prefix in self.allowed_prefixes):
            raise RepositoryError(f"{ref.uri} is not under an allowed artifact source (HOTSWAP_ARTIFACT_SOURCES)")
        final = self.root / model / f"{version}-{ref.sha256[:16]}"
        if not (final / "manifest.json").is_file():
            self._download(ref, final, model, version)
        entry = self._open(final, model, version)
        if entry.manifest.sha256 != ref.sha256:
            raise RepositoryError(
                f"the command pins sha256 {ref.sha256[:12]}…, the manifest {entry.manifest.sha256[:12]}…"
            )
        return entry

    def _download(self, ref: ArtifactRef, final: Path, model: str, version: str) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=final.parent))
        try:
            name = Path(urlparse(ref.uri).path).name
            base = ref.uri[: ref.uri.rindex("/") + 1]
            self._copy(base + "manifest.json", tmp / "manifest.json")
            manifest = self._open(tmp, model, version).manifest
            self._copy(ref.uri, tmp / name)
            # Calibration images travel with the artifact (their paths stay inside: Manifest checks).
            for item in manifest.calibration.images if manifest.calibration else []:
                (tmp / item.file).parent.mkdir(parents=True, exist_ok=True)
                self._copy(base + item.file, tmp / item.file)
            actual = sha256_of(tmp / name)
            if actual != ref.sha256:
                raise RepositoryError(
                    f"fetched {ref.uri} has sha256 {actual[:12]}…, the command pins {ref.sha256[:12]}…"
                )
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _copy(self, uri: str, target: Path) -> None:
        parsed = urlparse(uri)
        try:
            if parsed.scheme == "file":
                source = Path(unquote(parsed.path))
                if source.stat().st_size > MAX_ARTIFACT_BYTES:
                    raise RepositoryError(f"{uri} is over {MAX_ARTIFACT_BYTES} bytes")
                shutil.copyfile(source, target)
                return
            with urllib.request.urlopen(uri, timeout=self.timeout_s) as response, target.open("wb") as out:
                copied = 0
                while chunk := response.read(1 << 20):
                    copied += len(chunk)
                    if copied > MAX_ARTIFACT_BYTES:
                        raise RepositoryError(f"{uri} is over {MAX_ARTIFACT_BYTES} bytes")
                    out.write(chunk)
        except (OSError, URLError) as exc:
            raise RepositoryError(f"cannot fetch {uri}: {exc}") from exc

    @staticmethod
    def _open(directory: Path, model: str, version: str) -> VersionDir:
        try:
            manifest = Manifest.model_validate_json((directory / "manifest.json").read_bytes())
        except (OSError, ValidationError) as exc:
            raise RepositoryError(f"fetched manifest is invalid: {exc}") from exc
        if (manifest.name, manifest.version) != (model, version):
            raise RepositoryError(f"fetched manifest names {manifest.name}/{manifest.version}, not {model}/{version}")
        return VersionDir(manifest, directory)
