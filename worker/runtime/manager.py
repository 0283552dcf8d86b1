"""Loads model versions off the event loop and keeps the deployment table."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass

from worker.runtime.backend import create_backend
from worker.runtime.deployment import Deployment, DeploymentTable
from worker.runtime.lifecycle import ModelVersion, VersionState
from worker.runtime.repository import ModelRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """`shapes` (the newest release in the repository) or `shapes@1.0.0`."""

    model: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        model, _, version = text.partition("@")
        return cls(model.strip(), version.strip() or None)


class LoadFailed(Exception):
    def __init__(self, version: ModelVersion) -> None:
        super().__init__(f"{version.model}/{version.version}: {version.reason}")
        self.version = version


class ModelManager:
    def __init__(self, repository: ModelRepository, device: str, executor: Executor) -> None:
        self.repository = repository
        self.device = device
        self.executor = executor
        self.table = DeploymentTable()

    async def start(self, specs: list[ModelSpec]) -> None:
        """Load and activate one version per model; raises LoadFailed on the first failure."""
        for spec in specs:
            version = await self.load(spec.model, spec.version or self.repository.latest(spec.model))
            if version.state is VersionState.FAILED:
                raise LoadFailed(version)
            version.advance(VersionState.ACTIVE)
            self.table.swap(Deployment.single(version))

    async def load(self, model: str, version_name: str) -> ModelVersion:
        """Preload and validate in the executor; the returned version is READY or FAILED."""
        version = ModelVersion(model, version_name)
        loop = asyncio.get_running_loop()
        try:
            entry = self.repository.get(model, version_name)
            version.manifest = entry.manifest
            artifact = await loop.run_in_executor(self.executor, self.repository.verified_artifact, entry)
            backend = create_backend(entry.manifest.backend, self.device)
            await loop.run_in_executor(self.executor, backend.load, artifact, entry.manifest)
            version.backend = backend
            version.advance(VersionState.VALIDATING)
            await loop.run_in_executor(self.executor, backend.warm_up)
            version.advance(VersionState.READY)
        except Exception as exc:  # every failure is reported as the version's reason
            log.warning("loading %s/%s failed: %s", model, version_name, exc)
            version.fail(str(exc))
        return version
