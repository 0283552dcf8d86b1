"""Immutable per-model deployment snapshots.

A job takes the snapshot current when it is dispatched and runs entirely on the version it
resolved from it; a swap replaces the snapshot whole, so a job never sees half an update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from worker.runtime.lifecycle import ModelVersion


class UnknownVersion(LookupError):
    pass


@dataclass(frozen=True)
class Deployment:
    model: str
    active: ModelVersion
    loaded: Mapping[str, ModelVersion]

    @classmethod
    def single(cls, version: ModelVersion) -> Deployment:
        return cls(version.model, version, MappingProxyType({version.version: version}))

    def resolve(self, pin: str | None) -> ModelVersion:
        """The version a job runs on: its pin if it names a loaded version, else the active one."""
        if pin is None:
            return self.active
        version = self.loaded.get(pin)
        if version is None or not version.serving:
            loaded = ", ".join(sorted(self.loaded)) or "none"
            raise UnknownVersion(f"{self.model}/{pin} is not loaded on this worker (loaded: {loaded})")
        return version


class DeploymentTable:
    """The current snapshot per model. Swaps are reference assignments on the event loop."""

    def __init__(self) -> None:
        self._current: dict[str, Deployment] = {}

    def get(self, model: str) -> Deployment | None:
        return self._current.get(model)

    def swap(self, deployment: Deployment) -> Deployment | None:
        previous = self._current.get(deployment.model)
        self._current[deployment.model] = deployment
        return previous

    def all(self) -> list[Deployment]:
        return [self._current[name] for name in sorted(self._current)]
