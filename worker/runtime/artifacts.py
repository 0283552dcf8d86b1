"""Artifacts by URI: fetched into a content-addressed local cache, verified, then loaded.

An update may name its artifact by `file://` or `http(s)://` URI (workers on other machines
than the repository fetch them). The manifest is the `manifest.json` beside the artifact, and
the calibration images it names lie beside it too. Every URI fetched (the artifact, the
manifest, each calibration image, each redirect hop) passes the same `SourcePolicy` check
(invariant 6), and a cached copy is used only while its sha256 matches the command's and the
manifest's.

Each verified artifact is also kept by its sha256 (`<cache>/.sha256/<sha256>`, a hard link to the
version's copy): content-addressed, what this worker serves to its fleet (`worker.peers`) and
what another version with the same artifact reuses. The artifact itself (not the manifest nor the
calibration images, small and read from the source, which alone is trusted for them) is asked of
the fleet's peers first (`worker.runtime.peers`), then fetched from its source.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import urllib.request
from http.client import HTTPMessage
from pathlib import Path
from typing import IO
from urllib.error import URLError

from pydantic import ValidationError

from schemas.control import MAX_ANNOUNCED_ARTIFACTS, ArtifactRef
from schemas.manifest import Manifest
from worker.runtime.peers import PeerClient
from worker.runtime.repository import RepositoryError, VersionDir, copy_at_most, sha256_of
from worker.runtime.sources import Location, SourcePolicy, SourceRefused, parse

log = logging.getLogger(__name__)

MAX_ARTIFACT_BYTES = 4 * 1024**3
#: Where verified artifacts are kept by sha256, inside the cache: no model name starts with a dot.
BY_SHA256 = ".sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactCache:
    def __init__(self, root: Path, policy: SourcePolicy, timeout_s: float = 60.0,
                 peers: PeerClient | None = None) -> None:
        self.root = root
        self.policy = policy
        self.timeout_s = timeout_s
        #: Asked for each artifact before its source; None: the source only.
        self.peers = peers
        # No file:, ftp: or data: handlers: http(s) only, and every redirect checked like the first URI.
        self._opener = urllib.request.build_opener(_CheckedRedirects(policy))
        self._from_source: set[str] = set()
        self._lock = threading.Lock()

    def blob(self, sha256: str) -> Path | None:
        """The verified artifact with this sha256, if this cache holds it."""
        if not _SHA256.match(sha256):
            return None
        path = self.root / BY_SHA256 / sha256
        return path if path.is_file() else None

    def held(self) -> list[str]:
        """The sha256 of every verified artifact held, newest first (as many as a heartbeat lists)."""
        try:
            entries = [(e.stat().st_mtime, e.name) for e in os.scandir(self.root / BY_SHA256)
                       if _SHA256.match(e.name) and e.is_file()]
        except OSError:  # no cache yet
            return []
        return [name for _, name in sorted(entries, reverse=True)[:MAX_ANNOUNCED_ARTIFACTS]]

    def fetching(self) -> list[str]:
        """The sha256 of the artifacts being fetched from their source now (what peers wait for)."""
        with self._lock:
            return sorted(self._from_source)

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
            self._fetch_artifact(model, ref, tmp / manifest.artifact)
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
        self._keep(final / manifest.artifact, ref.sha256)

    def _fetch_artifact(self, model: str, ref: ArtifactRef, target: Path) -> None:
        """The artifact's bytes into `target`: held already, from a peer, or from its source. Only
        the source's copy is checked by the caller; every other is checked before it is taken."""
        held = self.blob(ref.sha256)
        if held is not None:
            shutil.copyfile(held, target)
            if sha256_of(target) == ref.sha256:
                return
        if self.peers is not None and self.peers.enabled and self.peers.fetch(model, ref.sha256, target):
            return
        with self._lock:
            self._from_source.add(ref.sha256)
        try:
            self._copy(ref.uri, target)
        finally:
            with self._lock:
                self._from_source.discard(ref.sha256)

    def _keep(self, artifact: Path, sha256: str) -> None:
        """File a verified artifact under its sha256 (a link: no second copy on disk)."""
        store = self.root / BY_SHA256
        store.mkdir(parents=True, exist_ok=True)
        staged = store / f".{sha256}.{os.getpid()}.{threading.get_ident()}"
        try:
            try:
                os.link(artifact, staged)
            except OSError:  # a file system without hard links
                shutil.copyfile(artifact, staged)
            os.replace(staged, store / sha256)  # whole or not at all: a peer never sees half of it
        except OSError as exc:  # serving it to peers is a courtesy; the update goes on without
            log.warning("cannot keep artifact %s… for peers: %s", sha256[:12], exc)
            staged.unlink(missing_ok=True)

    def _copy(self, uri: str, target: Path) -> None:
        location = self.policy.check(uri)
        try:
            if location.scheme == "file":
                _copy_file(location, target)
                return
            with self._opener.open(location.url, timeout=self.timeout_s) as response, target.open("wb") as out:
                copy_at_most(response, out, MAX_ARTIFACT_BYTES, uri)
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
