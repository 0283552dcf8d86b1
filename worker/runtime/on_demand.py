"""Versions loaded on demand: the first job pinned to a version the model allows this way
(`schemas.control.OnDemand`) loads it through the manager's preload → validate gate, and jobs
pinned to it share that one load. Once warm it takes pinned jobs only: it is in the deployment
snapshot's `on_demand`, never in its traffic split.

At most `max_warm` stay loaded: making room for one more evicts the least recently used idle one,
and one unused for `idle_unload_s` is unloaded. Idle means no job in flight on it and none
waiting for it; when every warm version is busy, the new one loads anyway and the pool is trimmed
back as soon as one is idle (a job is never refused for want of room). Eviction is the cleanup
phase of an update: out of the snapshot first, then drained, released, memory measured.

Versions the desired state keeps (active, standby, weights, shadow) are never in the pool: the
manager adopts a warm version the state comes to need, and loads a needed one as it always did.
All state changes happen on the event loop; loads and evictions hold the model's manager lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Protocol

from prometheus_client import Counter

from schemas.errors import ErrorCode, JobFailure
from worker.runtime.deployment import DeploymentTable, OnDemandVersion
from worker.runtime.desired import DesiredState
from worker.runtime.lifecycle import ModelVersion

log = logging.getLogger(__name__)

#: Why an on-demand version was unloaded: room for another, unused too long, no longer allowed.
EVICTION_REASONS = ("lru", "idle", "withdrawn")
LOAD_OUTCOMES = ("loaded", "failed")


class LoadRefused(Exception):
    """A load on demand failed: the version is unusable here (the manager remembers why)."""


class PoolHost(Protocol):
    """What the pool needs of the model manager."""

    table: DeploymentTable

    def lock(self, model: str) -> asyncio.Lock: ...

    def unusable(self, model: str) -> dict[str, str]: ...

    async def load_on_demand(self, version: ModelVersion, desired: DesiredState) -> None:
        """Preload and validate `version` (LOADING) to READY; raises LoadRefused."""
        ...

    async def free(self, version: ModelVersion) -> None: ...


class OnDemandMetrics(Protocol):
    on_demand_loads: Counter  # labels: model, outcome (LOAD_OUTCOMES)
    on_demand_evictions: Counter  # labels: model, reason (EVICTION_REASONS)


class OnDemandPool:
    def __init__(self, host: PoolHost, metrics: OnDemandMetrics | None = None) -> None:
        self.host = host
        self.metrics = metrics
        self._desired: dict[str, DesiredState] = {}
        self._warm: dict[str, dict[str, OnDemandVersion]] = {}
        self._loads: dict[tuple[str, str], asyncio.Task[ModelVersion]] = {}

    # --- what jobs ask -----------------------------------------------------------------------

    def allows(self, model: str, version: str) -> bool:
        desired = self._desired.get(model)
        return desired is not None and desired.allows_on_demand(version)

    async def acquire(self, model: str, name: str) -> ModelVersion:
        """The version loaded and serving, loading it first if need be; raises JobFailure.

        From the load's end to the caller counting itself in `in_flight` there is no await (a
        coroutine's return resumes its caller at once), and `waiting` covers the time before."""
        reason = self.host.unusable(model).get(name)
        if reason is not None:
            raise JobFailure(ErrorCode.VERSION_UNUSABLE, _unusable(model, name, reason))
        entry = self._warm.get(model, {}).get(name) or self._start_load(model, name)
        entry.waiting += 1
        try:
            task = self._loads.get((model, name))
            # Shielded: a job that gives up (cancelled) must not cancel the load the others share.
            version = await asyncio.shield(task) if task is not None else entry.version
        except LoadRefused as exc:
            raise JobFailure(ErrorCode.VERSION_UNUSABLE, _unusable(model, name, str(exc))) from exc
        finally:
            entry.waiting -= 1
        if not version.serving:  # withdrawn while this job waited
            raise JobFailure(ErrorCode.UNKNOWN_VERSION, f"{model}/{name} is no longer allowed on demand")
        return version

    def warm(self, model: str) -> Mapping[str, OnDemandVersion]:
        """The model's on-demand versions, loading ones included, for its deployment snapshot."""
        return MappingProxyType(dict(self._warm.get(model, {})))

    # --- loading -----------------------------------------------------------------------------

    def _start_load(self, model: str, name: str) -> OnDemandVersion:
        entry = OnDemandVersion(ModelVersion(model, name))
        self._warm.setdefault(model, {})[name] = entry
        self._publish(model)  # /status shows it loading
        task = asyncio.create_task(self._load(entry))
        self._loads[(model, name)] = task
        task.add_done_callback(_retrieve)
        return entry

    async def _load(self, entry: OnDemandVersion) -> ModelVersion:
        model, name = entry.version.model, entry.version.version
        try:
            async with self.host.lock(model):
                current = self.host.table.get(model)
                if current is not None and name in current.loaded:  # the desired state took it meanwhile
                    return current.loaded[name]
                if not self.allows(model, name):
                    raise JobFailure(ErrorCode.UNKNOWN_VERSION, f"{model}/{name} is no longer allowed on demand")
                await self._make_room(model, entry)
                try:
                    await self.host.load_on_demand(entry.version, self._desired[model])
                except LoadRefused:
                    self._count_load(model, "failed")
                    raise
                self._count_load(model, "loaded")
                log.info("%s/%s loaded on demand", model, name, extra={"model": model, "version": name})
                return entry.version
        finally:
            self._loads.pop((model, name), None)
            if not entry.version.serving:
                self._drop(model, name)

    async def _make_room(self, model: str, coming: OnDemandVersion) -> None:
        for victim in self._least_recently_used(model, coming):
            await self._evict(victim, "lru")

    def _least_recently_used(self, model: str, coming: OnDemandVersion | None = None) -> list[OnDemandVersion]:
        """The idle versions to evict so that at most max_warm stay (counting `coming`)."""
        desired = self._desired.get(model)
        others = [e for e in self._warm.get(model, {}).values() if e is not coming]
        limit = desired.on_demand.max_warm if desired is not None and desired.on_demand else 0
        excess = len(others) + (coming is not None) - limit
        idle = sorted((e for e in others if _evictable(e)), key=lambda e: e.last_used)
        return idle[: max(0, excess)]

    # --- what the manager tells --------------------------------------------------------------

    def set_policy(self, desired: DesiredState) -> None:
        self._desired[desired.model] = desired

    def adopt(self, model: str, needed: Iterable[str], acceptable: Callable[[ModelVersion], bool]
              ) -> dict[str, ModelVersion]:
        """Warm versions the desired state now keeps, where `acceptable`: they leave the pool and
        stay loaded. The caller swaps a snapshot in next, without them in `on_demand`."""
        warm = self._warm.get(model, {})
        return {name: warm.pop(name).version for name in needed
                if name in warm and warm[name].version.serving and acceptable(warm[name].version)}

    async def apply_policy_locked(self, model: str) -> None:
        """Evict what the model's policy no longer allows or has no room for (the lock is held)."""
        for entry in list(self._warm.get(model, {}).values()):
            if entry.version.serving and not self.allows(model, entry.version.version):
                await self._evict(entry, "withdrawn")
        for victim in self._least_recently_used(model):
            await self._evict(victim, "lru")

    # --- unloading ---------------------------------------------------------------------------

    async def sweep_forever(self) -> None:
        """Unload idle versions, and trim to max_warm what was busy when room was made."""
        while True:
            await asyncio.sleep(self._tick())
            for model in list(self._warm):
                try:
                    if self._idle(model) or self._least_recently_used(model):
                        async with self.host.lock(model):
                            await self._sweep_locked(model)
                except Exception:  # a bug here must not stop unloading for good
                    log.exception("unloading idle on-demand versions of %s failed", model)

    async def _sweep_locked(self, model: str) -> None:
        for entry in self._idle(model):
            await self._evict(entry, "idle")
        for victim in self._least_recently_used(model):
            await self._evict(victim, "lru")

    def _idle(self, model: str) -> list[OnDemandVersion]:
        desired = self._desired.get(model)
        if desired is None or desired.on_demand is None:
            return []
        now = time.time()
        for entry in self._warm.get(model, {}).values():
            if entry.busy:  # a long job keeps its version in use until it ends
                entry.last_used = now
        limit = desired.on_demand.idle_unload_s
        return [e for e in self._warm.get(model, {}).values() if _evictable(e) and now - e.last_used >= limit]

    def _tick(self) -> float:
        policies = [d.on_demand.idle_unload_s for d in self._desired.values() if d.on_demand is not None]
        return min(1.0, max(0.05, min(policies, default=4.0) / 4))

    async def _evict(self, entry: OnDemandVersion, reason: str) -> None:
        model, name = entry.version.model, entry.version.version
        self._drop(model, name)  # no new job resolves it; those already on it drain
        if self.metrics is not None:
            self.metrics.on_demand_evictions.labels(model, reason).inc()
        log.info("%s/%s unloaded (on demand: %s)", model, name, reason, extra={"model": model, "version": name})
        await self.host.free(entry.version)

    def _drop(self, model: str, name: str) -> None:
        self._warm.get(model, {}).pop(name, None)
        self._publish(model)

    def _publish(self, model: str) -> None:
        current = self.host.table.get(model)
        if current is not None:
            self.host.table.swap(replace(current, on_demand=self.warm(model)))

    def _count_load(self, model: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.on_demand_loads.labels(model, outcome).inc()


def _evictable(entry: OnDemandVersion) -> bool:
    return entry.version.serving and not entry.busy


def _unusable(model: str, name: str, reason: str) -> str:
    return f"{model}/{name} could not be loaded on demand on this worker: {reason}"


def _retrieve(task: asyncio.Task[ModelVersion]) -> None:
    # Every waiter may have given up: the load's failure is then nobody's, and already logged.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
