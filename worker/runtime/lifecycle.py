"""The lifecycle of one model version: a single explicit state machine.

    loading → validating → ready → active ⇄ standby → draining → freed
    (loading | validating) → failed, with a reason

Only the event loop thread changes a version's state; executor threads do the blocking work and
hand results back, so no lock is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from schemas.manifest import Manifest
from schemas.status import VersionDetail
from worker.runtime.backend import ModelBackend


class VersionState(StrEnum):
    LOADING = "loading"
    VALIDATING = "validating"
    READY = "ready"
    ACTIVE = "active"
    STANDBY = "standby"
    DRAINING = "draining"
    FREED = "freed"
    FAILED = "failed"


_ALLOWED: dict[VersionState, frozenset[VersionState]] = {
    VersionState.LOADING: frozenset({VersionState.VALIDATING, VersionState.FAILED}),
    VersionState.VALIDATING: frozenset({VersionState.READY, VersionState.FAILED}),
    VersionState.READY: frozenset({VersionState.ACTIVE, VersionState.STANDBY, VersionState.DRAINING}),
    VersionState.ACTIVE: frozenset({VersionState.STANDBY, VersionState.DRAINING}),
    VersionState.STANDBY: frozenset({VersionState.ACTIVE, VersionState.DRAINING}),
    VersionState.DRAINING: frozenset({VersionState.FREED}),
    VersionState.FREED: frozenset(),
    VersionState.FAILED: frozenset(),
}

#: States in which a version may take jobs.
SERVING = frozenset({VersionState.ACTIVE, VersionState.STANDBY, VersionState.READY})


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False)
class ModelVersion:
    model: str
    version: str
    backend: ModelBackend | None = None
    manifest: Manifest | None = None
    state: VersionState = VersionState.LOADING
    reason: str | None = None
    in_flight: int = 0
    history: list[tuple[VersionState, float]] = field(default_factory=list)
    #: Inference batches run, per batch size: the first of each size warm the backend up (a traced
    #: network specialises on each new input shape), so their time is not the version's speed.
    batches_run: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.history.append((self.state, time.time()))

    def advance(self, state: VersionState, reason: str | None = None) -> None:
        if state not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.model}/{self.version}: {self.state} → {state}")
        self.state, self.reason = state, reason
        self.history.append((state, time.time()))

    def fail(self, reason: str) -> None:
        self.advance(VersionState.FAILED, reason)

    def detail(self) -> VersionDetail:
        manifest = self.manifest
        return VersionDetail(state=self.state.value, reason=self.reason, in_flight=self.in_flight,
                             backend=manifest.backend if manifest else None, task=manifest.task if manifest else None,
                             sha256=manifest.sha256 if manifest else None)

    @property
    def loaded_manifest(self) -> Manifest:
        if self.manifest is None:
            raise IllegalTransition(f"{self.model}/{self.version} has no manifest: it was never loaded")
        return self.manifest

    @property
    def serving(self) -> bool:
        return self.state in SERVING
