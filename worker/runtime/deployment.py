"""Immutable per-model deployment snapshots.

A job takes the snapshot current when it is dispatched and runs entirely on the version it
resolved from it; a swap replaces the snapshot whole, so a job never sees half an update.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

from schemas.control import Shadow
from schemas.status import DeploymentStatus, VersionDetail
from worker.runtime.lifecycle import ModelVersion

#: Version aliases a job may pin instead of a version name.
STABLE, CANARY = "stable", "canary"


class UnknownVersion(LookupError):
    pass


def bucket(key: str, buckets: int = 10_000) -> int:
    """A stable bucket for a routing key: the same key lands in the same bucket on every worker."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % buckets


@dataclass(eq=False)
class OnDemandVersion:
    """A version loaded on demand (`worker.runtime.on_demand`): it takes pinned jobs only."""

    version: ModelVersion
    last_used: float = field(default_factory=time.time)
    #: Jobs waiting for it to load, or woken and about to count themselves in `in_flight`: eviction
    #: passes it over, as it passes over a version with jobs in flight.
    waiting: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.version.in_flight)

    def detail(self) -> VersionDetail:
        return self.version.detail().model_copy(
            update={"on_demand": True, "last_used": datetime.fromtimestamp(self.last_used, UTC)})


class OnDemandLoader(Protocol):
    """Loads a version a job pins when the model allows it on demand (`worker.runtime.on_demand`)."""

    def allows(self, model: str, version: str) -> bool: ...

    async def acquire(self, model: str, version: str) -> ModelVersion:
        """The version loaded and serving; raises JobFailure when it cannot be."""
        ...


@dataclass(frozen=True)
class Deployment:
    model: str
    active: ModelVersion
    loaded: Mapping[str, ModelVersion]
    #: Percent per version under a traffic split; None sends everything to `active`.
    weights: Mapping[str, float] | None = None
    shadow: Shadow | None = None
    #: Versions loaded on demand (none of `loaded`): only a job pinning one by name runs on it.
    on_demand: Mapping[str, OnDemandVersion] = field(default_factory=lambda: MappingProxyType({}))

    def status(self) -> DeploymentStatus:
        versions = {name: v.detail() for name, v in self.loaded.items()}
        versions.update((name, v.detail()) for name, v in self.on_demand.items())
        return DeploymentStatus(
            active=self.active.version, weights=dict(self.weights) if self.weights else None, shadow=self.shadow,
            versions=versions,
        )

    def resolve(self, pin: str | None, routing_key: str) -> ModelVersion:
        """The version a job runs on: its pin (a version or an alias), else by traffic weight."""
        if pin is None:
            return self._weighted(routing_key)
        name = {STABLE: self.active.version, CANARY: self._canary()}.get(pin, pin)
        version = self.loaded.get(name) if name else None
        warm = self.on_demand.get(name) if name and version is None else None
        if warm is not None:
            warm.last_used = time.time()  # the idle clock and LRU order count from each job's dispatch
            version = warm.version
        if version is None or not version.serving:
            loaded = ", ".join(sorted(self.loaded)) or "none"
            raise UnknownVersion(f"{self.model}/{pin} is not loaded on this worker (loaded: {loaded})")
        return version

    def shadow_for(self, routing_key: str, primary: ModelVersion) -> ModelVersion | None:
        """The shadow version this job also runs on, if it falls in the shadow share."""
        if self.shadow is None or self.shadow.version == primary.version:
            return None
        # A different salt from the split, so the shadow share is independent of the A/B bucket.
        if bucket("shadow:" + routing_key) >= self.shadow.percent * 100:
            return None
        return self.loaded.get(self.shadow.version)

    def _weighted(self, routing_key: str) -> ModelVersion:
        if not self.weights:
            return self.active
        point = bucket(routing_key) / 100  # 0 ≤ point < 100
        upto = 0.0
        for name, weight in sorted(self.weights.items()):
            upto += weight
            if point < upto:
                return self.loaded[name]
        return self.active

    def _canary(self) -> str | None:
        others = [n for n in (self.weights or {}) if n != self.active.version]
        return others[0] if others else None


class DeploymentTable:
    """The current snapshot per model. Swaps are reference assignments on the event loop."""

    def __init__(self) -> None:
        self._current: dict[str, Deployment] = {}
        #: Where a job pinning a version this table has not loaded may still get it; None: nowhere.
        self.on_demand: OnDemandLoader | None = None

    def get(self, model: str) -> Deployment | None:
        return self._current.get(model)

    def swap(self, deployment: Deployment) -> Deployment | None:
        previous = self._current.get(deployment.model)
        self._current[deployment.model] = deployment
        return previous

    def all(self) -> list[Deployment]:
        return [self._current[name] for name in sorted(self._current)]
