import pytest

from worker.runtime.lifecycle import IllegalTransition, ModelVersion, VersionState

S = VersionState


def test_the_happy_path_and_back() -> None:
    version = ModelVersion("shapes", "1.0.0")
    for state in (S.VALIDATING, S.READY, S.ACTIVE, S.STANDBY, S.ACTIVE, S.DRAINING, S.FREED):
        version.advance(state)
    assert [s for s, _ in version.history] == [S.LOADING, S.VALIDATING, S.READY, S.ACTIVE, S.STANDBY,
                                               S.ACTIVE, S.DRAINING, S.FREED]


@pytest.mark.parametrize(
    "path",
    [
        [S.ACTIVE],  # never validated
        [S.VALIDATING, S.ACTIVE],  # validation not finished
        [S.VALIDATING, S.READY, S.ACTIVE, S.FREED],  # freed without draining
        [S.FAILED, S.VALIDATING],  # failed is final
    ],
)
def test_illegal_transitions_are_refused(path: list[VersionState]) -> None:
    version = ModelVersion("shapes", "1.0.0")
    with pytest.raises(IllegalTransition):
        for state in path:
            version.advance(state)


def test_failure_keeps_its_reason_and_stops_serving() -> None:
    version = ModelVersion("shapes", "1.0.0")
    version.advance(S.VALIDATING)
    version.fail("calibration recall 0.00 < 0.50")
    assert (version.state, version.reason, version.serving) == (S.FAILED, "calibration recall 0.00 < 0.50", False)
