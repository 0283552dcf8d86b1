"""Artifacts by URI: fetched into a content-addressed local cache, verified, then loaded.

An update may name its artifact by `file://` or `http(s)://` URI (workers on other machines
than the repository fetch them). The manifest is the `manifest.json` beside the artifact, and
the calibration images it names lie beside it too. Every URI fetched (the artifact, the
manifest, each calibration image, each redirect hop) passes the same `SourcePolicy` check
(invariant 6), and a cached copy is used only while its sha256 matches the command's and the
manifest's.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.request
from http.client import HTTPMessage
from pathlib import Path
from typing import IO
from urllib.error import URLError

from pydantic import ValidationError

from schemas.control import ArtifactRef
from schemas.manifest import Manifest
from worker.runtime.repository import RepositoryError, VersionDir, sha256_of
from worker.runtime.sources import Location, SourcePolicy, SourceRefused, parse

MAX_ARTIFACT_BYTES = 4 * 1024**3


class ArtifactCache:
    def __init__(self, root: Path, policy: SourcePolicy, timeout_s: float = 60.0) -> None:
        self.root = root
        self.policy = policy
        self.timeout_s = timeout_s
        # No file:, ftp: or data: handlers: http(s) only, and every redirect checked like the first URI.
        self._opener = urllib.request.build_opener(_CheckedRedirects(policy))

    def fetch(self, model: str, version: str, ref: ArtifactRef) -> VersionDir:
        """Blocking: the cached version directory for `ref`, fetched first if needed."""
        self.policy.check(ref.uri)  # refused before the cache is even looked at
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
            requested = parse(ref.uri)  # siblings are found beside the URI as written, then checked themselves
            self._copy(requested.beside("manifest.json").url, tmp / "manifest.json")
            manifest = self._open(tmp, model, version).manifest
            # Stored under the manifest's (validated, plain) file name, never a name taken from the URI.
            self._copy(ref.uri, tmp / manifest.artifact)
            for item in manifest.calibration.images if manifest.calibration else []:
                (tmp / item.file).parent.mkdir(parents=True, exist_ok=True)
                self._copy(requested.beside(item.file).url, tmp / item.file)
            actual = sha256_of(tmp / manifest.artifact)
            if actual != ref.sha256:
                raise RepositoryError(
                    f"fetched {ref.uri} has sha256 {actual[:12]}…, the command pins {ref.sha256[:12]}…"
                )
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _copy(self, uri: str, target: Path) -> None:
        location = self.policy.check(uri)
        try:
            if location.scheme == "file":
                _copy_file(location, target)
                return
            with self._opener.open(location.url, timeout=self.timeout_s) as response, target.open("wb") as out:
                _copy_limited(uri, response, out)
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


def _copy_file(location: Location, target: Path) -> None:
    # The resolved path (no symlinks left in it); a FIFO or a device is no artifact.
    info = location.path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise RepositoryError(f"{location.url} is not a regular file")
    if info.st_size > MAX_ARTIFACT_BYTES:
        raise RepositoryError(f"{location.url} is over {MAX_ARTIFACT_BYTES} bytes")
    shutil.copyfile(location.path, target)


def _copy_limited(uri: str, response: IO[bytes], out: IO[bytes]) -> None:
    copied = 0
    while chunk := response.read(1 << 20):
        copied += len(chunk)
        if copied > MAX_ARTIFACT_BYTES:
            raise RepositoryError(f"{uri} is over {MAX_ARTIFACT_BYTES} bytes")
        out.write(chunk)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects on its own: each hop must pass the policy like the first URI."""

    def __init__(self, policy: SourcePolicy) -> None:
        self.policy = policy

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        try:
            location = self.policy.check(newurl)
        except SourceRefused as exc:
            fp.close()
            raise SourceRefused(f"{req.full_url} redirects to a refused location: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, location.url)
