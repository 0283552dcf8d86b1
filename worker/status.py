"""The worker's HTTP face: /healthz, /readyz, /status, /metrics, /profile (aiohttp), and /artifacts/<sha256>
for the fleet's peers (`worker.peers`) where the control plane holds a worker key."""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.status import WorkerStatus
from worker.metrics import WorkerMetrics
from worker.peers import ArtifactServer
from worker.runtime.profiling import STEPS

log = logging.getLogger(__name__)


class StatusSource(Protocol):
    metrics: WorkerMetrics

    def status(self) -> WorkerStatus: ...

    def not_ready_reasons(self) -> list[str]:
        """Empty when the worker is ready to take jobs."""
        ...

    def refresh_metrics(self) -> None: ...


def create_app(source: StatusSource, artifacts: ArtifactServer | None = None) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Alive as long as the event loop answers; readiness is /readyz's business.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reasons = source.not_ready_reasons()
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True})

    async def status(_: web.Request) -> web.Response:
        return web.Response(text=source.status().model_dump_json(), content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        source.refresh_metrics()
        body = generate_latest(source.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def profile(_: web.Request) -> web.Response:
        # CPU by step, cumulative: a reader takes differences over its own window.
        return web.json_response(STEPS.snapshot())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/profile", profile)
    if artifacts is not None:
        artifacts.add_to(app)
    return app


class StatusServer:
    def __init__(self, source: StatusSource, host: str, port: int, artifacts: ArtifactServer | None = None) -> None:
        self._runner = web.AppRunner(create_app(source, artifacts), access_log=None)
        self._host, self._port = host, port
        self.url = ""

    async def start(self) -> str:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        log.info("status server listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        await self._runner.cleanup()
