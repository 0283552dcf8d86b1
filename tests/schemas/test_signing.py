"""Signed status events: the operator believes a worker's event only with the worker key's
signature and only while it is recent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.control import Heartbeat, Progress
from schemas.signing import Refused, Signer, generate_keys


def progress(at: datetime | None = None, phase: str = "done") -> Progress:
    return Progress(worker_id="w1", command_id="c1", model="shapes", seq=1, phase=phase,
                    at=at or datetime.now(UTC))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Signer, Signer]:
    """(the workers' signer, an intruder's)."""
    ours = generate_keys(tmp_path_factory.mktemp("ours"))
    theirs = generate_keys(tmp_path_factory.mktemp("theirs"))
    return Signer.from_file(ours.worker_key), Signer.from_file(theirs.worker_key)


def test_a_signed_event_opens_to_itself(keys: tuple[Signer, Signer]) -> None:
    workers, _ = keys
    event = progress()
    assert workers.verifier().open_event(workers.sign_event(event), max_age_s=60) == event
    beat = Heartbeat(worker_id="w1", at=datetime.now(UTC), models={})
    assert workers.verifier().open_event(workers.sign_event(beat), max_age_s=60) == beat


def test_unsigned_forged_tampered_and_stale_events_are_refused_with_their_kind(keys: tuple[Signer, Signer]) -> None:
    workers, intruder = keys
    verifier = workers.verifier()
    genuine = workers.sign_event(progress(phase="failed"))
    cases = {
        "unsigned": progress().model_dump_json().encode(),
        "bad signature": intruder.sign_event(progress()),
        "stale": workers.sign_event(progress(at=datetime.now(UTC) - timedelta(seconds=61))),
    }
    tampered = genuine.replace(b'\\"phase\\":\\"failed\\"', b'\\"phase\\":\\"done\\"')
    assert tampered != genuine
    cases["bad signature (tampered)"] = tampered
    for kind, raw in cases.items():
        with pytest.raises(Refused) as refused:
            verifier.open_event(raw, max_age_s=60)
        assert refused.value.kind == kind.split(" (")[0], (kind, refused.value)
    with pytest.raises(Refused) as ahead:  # a clock far ahead is no better than a replay
        verifier.open_event(workers.sign_event(progress(at=datetime.now(UTC) + timedelta(minutes=5))), max_age_s=60)
    assert ahead.value.kind == "stale"


def test_generate_keys_writes_two_pairs_and_never_overwrites(tmp_path: Path) -> None:
    files = generate_keys(tmp_path)
    assert all(path.is_file() for path in files)
    assert files.worker_key.stat().st_mode & 0o077 == 0 and files.control_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path)
