from datetime import UTC, datetime

from schemas.control import Command, Rollback, Shadow, Traffic, Unload, Update
from worker.runtime.desired import reduce

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def cmd(seq: int, action: object, model: str = "shapes") -> Command:
    return Command(command_id=f"c{seq}", model=model, seq=seq, issued_at=NOW, issuer="t", action=action)


def test_updates_move_the_active_version_and_keep_the_last_as_standby() -> None:
    state = reduce("shapes", [cmd(1, Update(version="1.0.0")), cmd(2, Update(version="2.0.0"))])
    assert (state.active, state.standby, state.history, state.seq) == ("2.0.0", ("1.0.0",), ("1.0.0",), 2)
    assert state.needed == ("2.0.0", "1.0.0")


def test_replaced_versions_are_not_needed() -> None:
    log = [cmd(i + 1, Update(version=v)) for i, v in enumerate(["1.0.0", "1.1.0", "1.2.0", "2.0.0"])]
    assert reduce("shapes", log, keep_standby=1).needed == ("2.0.0", "1.2.0")
    assert reduce("shapes", log, keep_standby=0).needed == ("2.0.0",)


def test_order_duplicates_and_other_models_do_not_matter() -> None:
    log = [cmd(2, Update(version="2.0.0")), cmd(1, Update(version="1.0.0")), cmd(1, Update(version="9.0.0")),
           cmd(3, Update(version="7.0.0"), model="faces")]
    assert reduce("shapes", log).active == "2.0.0"


def test_rollback_goes_back_one_step_at_a_time_or_to_a_named_version() -> None:
    log = [cmd(1, Update(version="1.0.0")), cmd(2, Update(version="2.0.0")), cmd(3, Update(version="3.0.0"))]
    once = reduce("shapes", [*log, cmd(4, Rollback())])
    assert (once.active, once.standby) == ("2.0.0", ("3.0.0",))
    twice = reduce("shapes", [*log, cmd(4, Rollback()), cmd(5, Rollback())])
    assert twice.active == "1.0.0"
    assert reduce("shapes", [*log, cmd(4, Rollback(to="1.0.0"))]).active == "1.0.0"


def test_updates_to_unusable_versions_change_nothing() -> None:
    log = [cmd(1, Update(version="1.0.0")), cmd(2, Update(version="0.9.0-bad")), cmd(3, Rollback())]
    # Where 0.9.0-bad failed validation, the rollback goes to what was active before 1.0.0: nothing.
    state = reduce("shapes", log, unusable={"0.9.0-bad"})
    assert (state.active, state.seq) == ("1.0.0", 3)


def test_canary_and_traffic_split_then_promote() -> None:
    log = [cmd(1, Update(version="1.0.0")), cmd(2, Update(version="2.0.0", activate="canary", canary_percent=10))]
    canary = reduce("shapes", log)
    assert (canary.active, canary.weights) == ("1.0.0", {"1.0.0": 90, "2.0.0": 10})
    assert set(canary.needed) == {"1.0.0", "2.0.0"}
    split = reduce("shapes", [*log, cmd(3, Traffic(weights={"1.0.0": 50, "2.0.0": 50},
                                                   shadow=Shadow(version="2.0.0", percent=20)))])
    assert split.weights == {"1.0.0": 50, "2.0.0": 50} and split.shadow is not None
    promoted = reduce("shapes", [*log, cmd(3, Traffic(weights={"2.0.0": 100}))])
    assert (promoted.active, promoted.weights, promoted.standby) == ("2.0.0", None, ("1.0.0",))


def test_unload_drops_a_standby_but_never_the_active_version() -> None:
    log = [cmd(1, Update(version="1.0.0")), cmd(2, Update(version="2.0.0"))]
    assert reduce("shapes", [*log, cmd(3, Unload(version="1.0.0"))]).needed == ("2.0.0",)
    assert reduce("shapes", [*log, cmd(3, Unload(version="2.0.0"))]).active == "2.0.0"


def test_a_starting_worker_serves_its_initial_version_until_told_otherwise() -> None:
    assert reduce("shapes", [], initial="1.0.0").needed == ("1.0.0",)
    assert reduce("shapes", [cmd(1, Update(version="2.0.0"))], initial="1.0.0").needed == ("2.0.0", "1.0.0")
