"""Fetching artifacts by URI against real HTTP servers and real file trees: every URI fetched (the
artifact, the manifest and calibration images beside it, each redirect hop) passes the policy."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from schemas.control import ArtifactRef
from schemas.manifest import Calibration, CalibrationImage, Manifest
from worker.runtime.artifacts import ArtifactCache
from worker.runtime.repository import RepositoryError, sha256_of
from worker.runtime.sources import SourcePolicy, SourceRefused
from worker.runtime.trivial_backend import trivial_artifact


def publish(root: Path, version: str) -> str:
    """`<root>/shapes/<version>/` holding a trivial model and one calibration image; its sha256."""
    directory = root / "shapes" / version
    (directory / "calibration").mkdir(parents=True)
    (directory / "model.json").write_bytes(trivial_artifact())
    (directory / "calibration/a.png").write_bytes(f"image of {version}".encode())
    manifest = Manifest(
        name="shapes", version=version, backend="trivial", task="detect", artifact="model.json", format="json",
        sha256=sha256_of(directory / "model.json"), classes={0: "thing"}, input_size=32,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        calibration=Calibration(images=[CalibrationImage(file="calibration/a.png", expected=[])], min_recall=0),
    )
    (directory / "manifest.json").write_text(manifest.model_dump_json())
    return manifest.sha256


@dataclass
class Server:
    url: str = ""
    hits: list[str] = field(default_factory=list)  # raw paths requested, in order


Serve = Callable[[web.Application], Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start real aiohttp servers on free ports, recording every request; all stopped afterwards."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> Server:
        server = Server()

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            server.hits.append(request.raw_path)
            response: web.StreamResponse = await handler(request)
            return response

        app.middlewares.append(record)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


def cached(cache_root: Path) -> list[Path]:
    directory = cache_root / "shapes"
    return list(directory.iterdir()) if directory.is_dir() else []


@pytest.fixture
def trees(tmp_path: Path) -> dict[str, Path]:
    """published/ (the source), secret/ beside it: both hold shapes/4.0.0."""
    trees = {name: tmp_path / name for name in ("published", "secret")}
    for root in trees.values():
        publish(root, "4.0.0")
    return trees


async def fetch(cache: ArtifactCache, uri: str, sha: str) -> Path:
    entry = await asyncio.to_thread(cache.fetch, "shapes", "4.0.0", ArtifactRef(uri=uri, sha256=sha))
    return entry.path


def redirecting(target: Callable[[str], str]) -> web.RouteDef:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(target(request.match_info["tail"]))

    return web.get(f"/models/{target.__name__}/{{tail:.*}}", redirect)


async def test_http_fetches_only_what_the_policy_allows_and_follows_only_allowed_redirects(
    serve: Serve, trees: dict[str, Path], tmp_path: Path
) -> None:
    outside = await serve(_static_app(trees["secret"], "/models/"))

    def moved_in(tail: str) -> str:
        return f"/models/{tail}"

    def moved_out(tail: str) -> str:
        return f"{outside.url}/models/{tail}"

    def moved_up(tail: str) -> str:
        return f"/secret/{tail}"

    def moved_dots(tail: str) -> str:
        return f"/models/%2e%2e/secret/{tail}"

    app = web.Application()
    app.add_routes([redirecting(f) for f in (moved_in, moved_out, moved_up, moved_dots)])
    app.router.add_static("/secret/", trees["secret"])
    app.router.add_static("/models/", trees["published"])
    server = await serve(app)
    cache = ArtifactCache(tmp_path / "cache", SourcePolicy([f"{server.url}/models/"]))
    sha = sha256_of(trees["published"] / "shapes/4.0.0/model.json")

    refused = {
        f"{server.url}/models/../secret/shapes/4.0.0/model.json": r"'\.\.'",
        f"{server.url}/models/%2e%2e/secret/shapes/4.0.0/model.json": r"'\.\.'",
        f"{server.url}/models/shapes/..%2f..%2fsecret/shapes/4.0.0/model.json": "encoded '/'",
        f"{server.url}/secret/shapes/4.0.0/model.json": "not under an allowed artifact source",
        f"{outside.url}/models/shapes/4.0.0/model.json": "not under an allowed artifact source",
    }
    for uri, reason in refused.items():
        with pytest.raises(SourceRefused, match=reason):
            await fetch(cache, uri, sha)
    assert server.hits == [] and outside.hits == [], "a refused URI was requested"

    for hop in ("moved_out", "moved_up", "moved_dots"):
        with pytest.raises(SourceRefused, match="redirects to a refused location"):
            await fetch(cache, f"{server.url}/models/{hop}/shapes/4.0.0/model.json", sha)
    assert outside.hits == [] and not any("secret" in hit for hit in server.hits), server.hits
    assert not cached(tmp_path / "cache"), "a refused fetch left something in the cache"

    fetched = await fetch(cache, f"{server.url}/models/moved_in/shapes/4.0.0/model.json", sha)
    assert (fetched / "model.json").read_bytes() == trivial_artifact()
    assert (fetched / "calibration/a.png").read_bytes() == b"image of 4.0.0"
    assert {"/models/shapes/4.0.0/manifest.json", "/models/shapes/4.0.0/calibration/a.png"} <= set(server.hits)


def _static_app(root: Path, prefix: str) -> web.Application:
    app = web.Application()
    app.router.add_static(prefix, root)
    return app


async def test_file_fetches_check_the_manifest_and_calibration_images_beside_the_artifact(
    trees: dict[str, Path], tmp_path: Path
) -> None:
    published, secret = trees["published"] / "shapes/4.0.0", trees["secret"] / "shapes/4.0.0"
    cache = ArtifactCache(tmp_path / "cache", SourcePolicy([f"file://{trees['published']}"]))
    sha = sha256_of(published / "model.json")
    uri = f"file://{published}/model.json"

    with pytest.raises(SourceRefused, match="not under"):
        await fetch(cache, f"file://{trees['published']}/../secret/shapes/4.0.0/model.json", sha)
    with pytest.raises(SourceRefused, match="not under"):
        await fetch(cache, f"file://{trees['published']}/%2e%2e/secret/shapes/4.0.0/model.json", sha)

    # The calibration image, then the manifest, swapped for links to the copies outside the source.
    image = published / "calibration/a.png"
    image.unlink()
    image.symlink_to(secret / "calibration/a.png")
    with pytest.raises(SourceRefused, match=r"calibration/a\.png is not under"):
        await fetch(cache, uri, sha)
    image.unlink()
    shutil.copyfile(secret / "calibration/a.png", image)
    manifest = published / "manifest.json"
    manifest.unlink()
    manifest.symlink_to(secret / "manifest.json")
    with pytest.raises(SourceRefused, match=r"manifest\.json is not under"):
        await fetch(cache, uri, sha)
    assert not cached(tmp_path / "cache")

    manifest.unlink()
    shutil.copyfile(secret / "manifest.json", manifest)
    assert (await fetch(cache, uri, sha)).joinpath("calibration/a.png").is_file()


async def test_a_fifo_inside_the_source_is_not_read(trees: dict[str, Path], tmp_path: Path) -> None:
    published = trees["published"] / "shapes/4.0.0"
    (published / "model.json").unlink()
    os.mkfifo(published / "model.json")  # reading it would block the control thread for good
    cache = ArtifactCache(tmp_path / "cache", SourcePolicy([f"file://{trees['published']}"]))
    with pytest.raises(RepositoryError, match="not a regular file"):
        await fetch(cache, f"file://{published}/model.json", "0" * 64)
