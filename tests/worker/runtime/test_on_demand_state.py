"""Loading on demand in the desired state: folded from the log like every other command."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.control import Action, Command, OnDemand, Rollback, Update
from worker.runtime.desired import reduce

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def cmd(seq: int, action: Action, model: str = "parsing") -> Command:
    return Command(command_id=f"c{seq}", model=model, seq=seq, issued_at=NOW, issuer="t", action=action)


LAZY = OnDemand(versions=["1.0.0", "2.0.0"], max_warm=2, idle_unload_s=300)


def test_on_demand_versions_are_allowed_but_never_needed() -> None:
    state = reduce("parsing", [cmd(1, LAZY)], initial="3.0.0")
    assert state.on_demand == LAZY and state.seq == 1
    assert state.allows_on_demand("2.0.0") and not state.allows_on_demand("3.0.0")
    assert state.needed == ("3.0.0",)  # loaded by jobs, worker by worker, not by the state


def test_the_newest_policy_replaces_the_last_and_an_empty_list_turns_it_off() -> None:
    narrower = OnDemand(versions=["2.0.0"], max_warm=1, idle_unload_s=5)
    assert reduce("parsing", [cmd(1, LAZY), cmd(2, narrower)]).on_demand == narrower
    off = reduce("parsing", [cmd(1, LAZY), cmd(2, OnDemand(versions=[]))])
    assert off.on_demand is None and not off.allows_on_demand("1.0.0")


def test_other_commands_keep_the_policy_and_it_keeps_theirs() -> None:
    log = [cmd(1, Update(version="1.0.0")), cmd(2, LAZY), cmd(3, Update(version="2.0.0")), cmd(4, Rollback())]
    state = reduce("parsing", log)
    assert state.on_demand == LAZY
    assert (state.active, state.standby) == ("1.0.0", ("2.0.0",))
    without = reduce("parsing", [c for c in log if c.seq != 2])
    assert (without.active, without.standby, without.history) == (state.active, state.standby, state.history)


def test_a_late_worker_reduces_the_same_state_from_the_log() -> None:
    log = [cmd(1, Update(version="1.0.0")), cmd(2, LAZY), cmd(3, Update(version="2.0.0", activate="standby")),
           cmd(4, OnDemand(versions=["0.9.0", "2.0.0"], max_warm=1, idle_unload_s=30)),
           cmd(5, OnDemand(versions=["0.9.0"], max_warm=3, idle_unload_s=60)), cmd(4, LAZY),
           cmd(6, Update(version="7.0.0"), model="faces")]
    live = reduce("parsing", log, initial="1.0.0")
    shuffled = log[:]
    random.Random(14).shuffle(shuffled)
    late = reduce("parsing", [*shuffled, *shuffled], initial="1.0.0")  # any order, replayed twice
    assert late == live
    assert live.on_demand == OnDemand(versions=["0.9.0"], max_warm=3, idle_unload_s=60) and live.seq == 5


def test_the_command_is_checked_on_the_wire() -> None:
    for bad in ({"versions": ["1.0.0"], "max_warm": 0}, {"versions": ["1.0.0"], "idle_unload_s": 0},
                {"versions": ["1.0.0", "1.0.0"]}, {"versions": ["../etc"]}):
        with pytest.raises(ValidationError):
            OnDemand.model_validate(bad)
