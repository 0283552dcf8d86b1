"""Brings each model's loaded versions to its desired state: preload → validate → swap → cleanup.

One reconcile per model at a time (a lock), all blocking work in the control executor, state
changes on the event loop. Serving never waits for any of it: the old deployment snapshot
serves until the new one replaces it whole.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from schemas.control import ArtifactRef, Phase
from worker.runtime.artifacts import ArtifactCache
from worker.runtime.backend import blank_image, create_backend
from worker.runtime.deployment import Deployment, DeploymentTable
from worker.runtime.desired import DesiredState
from worker.runtime.lifecycle import ModelVersion, VersionState
from worker.runtime.load_slots import LoadSlots, Slot
from worker.runtime.memory import freeze_before_first_version, memory_in_use, return_freed_memory
from worker.runtime.on_demand import LoadRefused, OnDemandPool
from worker.runtime.repository import ModelRepository, RepositoryError
from worker.runtime.validation import (
    LatencyBudget,
    ValidationFailed,
    check_calibration,
    check_contract,
    check_latency,
    check_requirements,
)
from worker.runtime.weights import ArtifactLoader

log = logging.getLogger(__name__)
T = TypeVar("T")

class LifecycleMetrics(Protocol):
    """What the manager records (the worker's `WorkerMetrics` has it): the runtime names the
    metrics it needs instead of importing the worker's registry."""

    update_phase_seconds: Histogram  # labels: model, phase
    memory_released: Gauge  # labels: model
    on_demand_loads: Counter  # labels: model, outcome
    on_demand_evictions: Counter  # labels: model, reason


#: Called as each phase begins: (model, version, phase). Phase durations go to the metrics.
ProgressCallback = Callable[[str, str, Phase], Awaitable[None]]


async def no_progress(*_: Any) -> None:
    return None


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


@dataclass(frozen=True)
class Cleanup:
    version: str
    memory_before: int
    memory_after: int


class ModelManager:
    def __init__(
        self,
        repository: ModelRepository,
        device: str,
        control_executor: Executor,
        budget: LatencyBudget | None = None,
        metrics: LifecycleMetrics | None = None,
        artifacts: ArtifactCache | None = None,
        loader: ArtifactLoader | None = None,
        slots: LoadSlots | None = None,
    ) -> None:
        self.repository = repository
        self.artifacts = artifacts
        self.loader = loader or ArtifactLoader()
        #: The host's load slots (by default none: this manager's loads never wait for one).
        self.slots = slots or LoadSlots()
        self.metrics = metrics
        self.device = device
        self.executor = control_executor
        self.budget = budget or LatencyBudget()
        self.table = DeploymentTable()
        #: Versions holding a backend (not freed), per model.
        self.loaded: dict[str, dict[str, ModelVersion]] = {}
        #: Versions that failed here, with why: updates to them are ignored (DesiredState).
        self._unusable: dict[str, dict[str, str]] = {}
        self.cleanups: list[Cleanup] = []
        self._locks: dict[str, asyncio.Lock] = {}
        #: Versions jobs load by pinning them, where the desired state allows it (DesiredState.on_demand).
        self.on_demand = OnDemandPool(self, metrics)
        self.table.on_demand = self.on_demand

    def lock(self, model: str) -> asyncio.Lock:
        """Held by whatever changes the model's loaded versions: a reconcile, a load on demand, an eviction."""
        return self._locks.setdefault(model, asyncio.Lock())

    def unusable(self, model: str) -> dict[str, str]:
        """The model's versions that failed on this worker, with why (a copy)."""
        return dict(self._unusable.get(model, {}))

    def unusable_everywhere(self) -> dict[str, dict[str, str]]:
        return {model: dict(failed) for model, failed in self._unusable.items() if failed}

    def retry(self, model: str, version: str) -> None:
        """Let a version that failed here be tried again (a new update of it asks for that)."""
        self._unusable.get(model, {}).pop(version, None)

    async def start(self, specs: list[ModelSpec]) -> None:
        """Load and activate one version per model; raises LoadFailed on the first failure."""
        for spec in specs:
            name = spec.version or self.repository.latest(spec.model)
            await self.reconcile(DesiredState(spec.model, active=name))

    async def reconcile(self, desired: DesiredState, progress: ProgressCallback = no_progress) -> None:
        """Make the model's deployment match `desired`; raises LoadFailed, leaving serving as it was."""
        model = desired.model
        self.on_demand.set_policy(desired)
        async with self.lock(model):
            loaded = self.loaded.setdefault(model, {})
            current = self.table.get(model)
            # Warm already: no second load, but the gate an update applies that loading on demand
            # waived (the contract) still holds.
            loaded.update(self.on_demand.adopt(model, desired.needed, lambda v: _keeps_contract(v, desired, current)))
            for name in desired.needed:
                if name not in loaded:
                    baseline = current.active if current else None
                    source = desired.sources.get(name)
                    ref = source.artifact if source is not None else None
                    new_contract = source is not None and source.new_contract
                    loaded[name] = await self._load(model, name, baseline, progress, ref, new_contract)
            with self._timed(model, "swap"):
                self._swap(desired, loaded)
            await progress(model, desired.active or "", "swap")
            for name in [n for n in loaded if n not in desired.needed]:
                with self._timed(model, "cleanup"):
                    await self._free(loaded.pop(name), progress)
            await self.on_demand.apply_policy_locked(model)

    async def load_on_demand(self, version: ModelVersion, desired: DesiredState) -> None:
        """Preload and validate a version a pinned job asked for (the model's lock is held);
        raises LoadRefused, the version then unusable here like a failed update."""
        current = self.table.get(version.model)
        source = desired.sources.get(version.version)
        try:
            # The contract check is waived: a producer pinning a version asks for that version's
            # shape of answer. The latency budget still holds against the version serving.
            await self._load(version.model, version.version, current.active if current else None, no_progress,
                             source.artifact if source else None, new_contract=True, version=version)
        except LoadFailed as exc:
            raise LoadRefused(version.reason or str(exc)) from exc

    async def free(self, version: ModelVersion) -> None:
        with self._timed(version.model, "cleanup"):
            await self._free(version, no_progress)

    async def _load(
        self, model: str, name: str, baseline: ModelVersion | None, progress: ProgressCallback,
        ref: ArtifactRef | None = None, new_contract: bool = False, version: ModelVersion | None = None,
    ) -> ModelVersion:
        version = version or ModelVersion(model, name)
        started = time.perf_counter()
        await progress(model, name, "preload")
        slot = Slot(None, 0.0)
        try:
            with self._timed(model, "preload"):
                if ref is None:
                    entry = self.repository.get(model, name)
                elif self.artifacts is None:
                    raise RepositoryError("this worker fetches no artifacts by URI (no HOTSWAP_ARTIFACT_SOURCES)")
                else:
                    entry = await self._run(self.artifacts.fetch, model, name, ref)
                version.manifest = entry.manifest
                check_requirements(entry.manifest)
                check_contract(entry.manifest, baseline.manifest if baseline else None, new_contract)
                # The fetch above is I/O and may be long: only what costs the host CPU (and device
                # memory) takes turns with the host's other workers.
                slot = await self.slots.acquire(f"{model}/{name}")
                artifact = await self._run(self.repository.verified_artifact, entry)
                backend = create_backend(entry.manifest.backend, self.device, self.loader, task=entry.manifest.task)
                await self._run(freeze_before_first_version)  # the backend's libraries are imported by now
                await self._run(backend.load, artifact, entry.manifest)
                version.backend = backend
            version.advance(VersionState.VALIDATING)
            await progress(model, name, "validate")
            with self._timed(model, "validate"):
                await self._run(backend.warm_up)
                calibrated = await self._run(check_calibration, backend, entry.manifest, entry.path)
                other = baseline.backend if baseline is not None and baseline.version != name else None
                if other is not None:  # the budget is relative to the version serving now
                    # Without calibration images, a blank frame still shows the cost of the network.
                    images = calibrated.images or [blank_image(entry.manifest.input_size)]
                    await self._run(check_latency, backend, other, images, self.budget)
            version.advance(VersionState.READY)
            # The load's and validation's temporaries (weights read, traces, calibration batches)
            # would stay mapped for the next batches (`keep_freed_memory`): they go back now.
            await self._run(return_freed_memory)
        except Exception as exc:  # every failure is the version's reason; serving is untouched
            log.warning("%s/%s refused: %s", model, name, exc, extra={"model": model, "version": name})
            version.fail(str(exc))
            self._unusable.setdefault(model, {})[name] = str(exc)
            if version.backend is not None:
                await self._run(_release, version)
            raise LoadFailed(version) from exc
        finally:
            slot.release()
        log.info("%s/%s ready (loaded and validated in %.2f s)", model, name, time.perf_counter() - started,
                 extra={"model": model, "version": name})
        return version

    def _swap(self, desired: DesiredState, loaded: dict[str, ModelVersion]) -> None:
        assert desired.active is not None
        for name in desired.needed:
            target = VersionState.ACTIVE if name == desired.active else VersionState.STANDBY
            if loaded[name].state is not target:
                loaded[name].advance(target)
        deployment = Deployment(
            model=desired.model,
            active=loaded[desired.active],
            loaded=MappingProxyType({name: loaded[name] for name in desired.needed}),
            weights=MappingProxyType(dict(desired.weights)) if desired.weights else None,
            shadow=desired.shadow,
            on_demand=self.on_demand.warm(desired.model),
        )
        self.table.swap(deployment)  # the only step jobs can see: one reference assignment

    async def _free(self, version: ModelVersion, progress: ProgressCallback) -> None:
        version.advance(VersionState.DRAINING)
        await progress(version.model, version.version, "cleanup")
        while version.in_flight:  # jobs dispatched on the old snapshot finish on it
            await asyncio.sleep(0.005)
        before = memory_in_use(self.device)
        await self._run(_release, version)
        after = memory_in_use(self.device)
        version.advance(VersionState.FREED)
        self.cleanups.append(Cleanup(version.version, before, after))
        if self.metrics is not None:
            self.metrics.memory_released.labels(version.model).set(before - after)
        # `extra`: the version freed, where the command's context names the one it asked for.
        log.info("%s/%s freed: memory %d → %d bytes", version.model, version.version, before, after,
                 extra={"model": version.model, "version": version.version, "memory_before": before,
                        "memory_after": after})

    @contextmanager
    def _timed(self, model: str, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.metrics is not None:
            self.metrics.update_phase_seconds.labels(model, phase).observe(time.perf_counter() - started)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def _keeps_contract(version: ModelVersion, desired: DesiredState, current: Deployment | None) -> bool:
    source = desired.sources.get(version.version)
    try:
        check_contract(version.loaded_manifest, current.active.loaded_manifest if current else None,
                       source is not None and source.new_contract)
    except ValidationFailed:
        return False  # loaded again through the gate instead, which fails it with the reason
    return True


def _release(version: ModelVersion) -> None:
    if version.backend is not None:
        version.backend.release()
        version.backend = None
    gc.collect()
    return_freed_memory()
