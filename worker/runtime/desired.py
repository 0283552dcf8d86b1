"""The desired state of a model, reduced from its control log.

A pure function of the commands (and of the versions this worker found unusable), so a worker
that starts late, reconnects or restarts computes the same state as one that saw every command
live, and loads only what that state needs: versions a later command replaced are never loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, field, replace

from schemas.control import Command, OnDemand, Rollback, Shadow, Traffic, Unload, Update


@dataclass(frozen=True)
class DesiredState:
    model: str
    active: str | None = None
    #: Versions kept loaded besides the active one, newest first.
    standby: tuple[str, ...] = ()
    #: Percent per version when traffic is split; None: everything to `active`.
    weights: dict[str, float] | None = None
    shadow: Shadow | None = None
    #: Earlier active versions, most recent last: where a plain rollback goes.
    history: tuple[str, ...] = ()
    seq: int = 0
    #: Where each version's artifact comes from, when not from the repository.
    sources: dict[str, Update] = field(default_factory=dict)
    #: Versions a pinned job may load on demand, and their bounds; None: none. Never in `needed`:
    #: each worker loads them when its jobs ask, so what is warm differs from worker to worker.
    on_demand: OnDemand | None = None

    def allows_on_demand(self, version: str) -> bool:
        return self.on_demand is not None and version in self.on_demand.versions

    @property
    def needed(self) -> tuple[str, ...]:
        """Every version this state keeps loaded, active first."""
        ordered = [self.active, *self.standby, *(self.weights or {})]
        if self.shadow is not None:
            ordered.append(self.shadow.version)
        return tuple(dict.fromkeys(v for v in ordered if v is not None))


def reduce(
    model: str,
    commands: Iterable[Command],
    unusable: Set[str] = frozenset(),
    keep_standby: int = 1,
    initial: str | None = None,
) -> DesiredState:
    """Fold commands (any order; duplicates and stale sequence numbers are ignored) into a state.

    Updates to an `unusable` version (it failed validation here) change nothing, as they changed
    nothing on the workers that saw them live.
    """
    state = DesiredState(model, active=initial)
    for command in sorted(commands, key=lambda c: c.seq):
        if command.model != model or command.seq <= state.seq:
            continue
        state = replace(_apply(state, command, unusable, keep_standby), seq=command.seq)
    return state


def _apply(state: DesiredState, command: Command, unusable: Set[str], keep: int) -> DesiredState:
    action = command.action
    if isinstance(action, Update):
        if action.version in unusable:
            return state
        sources = {**state.sources, action.version: action}
        if action.activate == "standby":
            standby = _trim((action.version, *state.standby), state.active, keep)
            return replace(state, standby=standby, sources=sources)
        if action.activate == "canary" and state.active not in (None, action.version):
            assert action.canary_percent is not None and state.active is not None
            weights = {state.active: 100 - action.canary_percent, action.version: action.canary_percent}
            return replace(state, weights=weights, sources=sources)
        return replace(_activate(state, action.version, keep), sources=sources)
    if isinstance(action, Rollback):
        target = action.to or next((v for v in reversed(state.history) if v not in unusable), None)
        if target is None or target in unusable or target == state.active:
            return state
        return _activate(state, target, keep, rolling_back=True)
    if isinstance(action, Traffic):
        weights = {v: w for v, w in action.weights.items() if w > 0}
        if any(v in unusable for v in weights):
            return state
        if len(weights) == 1:
            return replace(_activate(state, next(iter(weights)), keep), shadow=action.shadow)
        return replace(state, weights=weights, shadow=action.shadow)
    if isinstance(action, Unload):
        if action.version == state.active:
            return state  # never unload what serves; the worker reports the refusal
        return replace(
            state,
            standby=tuple(v for v in state.standby if v != action.version),
            shadow=None if state.shadow and state.shadow.version == action.version else state.shadow,
            weights=None if state.weights and action.version in state.weights else state.weights,
        )
    if isinstance(action, OnDemand):
        # The newest policy replaces the last whole; an empty list turns it off.
        return replace(state, on_demand=action if action.versions else None)
    raise AssertionError(f"unhandled action {action!r}")


def _activate(state: DesiredState, version: str, keep: int, rolling_back: bool = False) -> DesiredState:
    previous = state.active
    history = state.history
    if rolling_back:
        # Rolling back pops the history down to the target, so a second rollback goes further.
        history = history[: history.index(version)] if version in history else history
    elif previous is not None and previous != version:
        history = (*history, previous)
    standby = (previous, *state.standby) if previous and previous != version else state.standby
    return replace(
        state, active=version, weights=None, shadow=None, history=history, standby=_trim(standby, version, keep)
    )


def _trim(standby: Iterable[str], active: str | None, keep: int) -> tuple[str, ...]:
    unique = [v for v in dict.fromkeys(standby) if v != active]
    return tuple(unique[:keep])
