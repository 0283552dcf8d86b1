import shutil
from pathlib import Path

import pytest

from worker.runtime.repository import ModelRepository, RepositoryError, is_release, release_key


@pytest.fixture
def repo(zoo: Path, tmp_path: Path) -> ModelRepository:
    shutil.copytree(zoo / "shapes" / "1.0.0", tmp_path / "shapes" / "1.0.0")
    return ModelRepository(tmp_path)


def test_versions_sort_as_pep_440_says_with_labelled_builds_below_their_release() -> None:
    versions = ["2.0.0", "0.9.0-bad", "10.0.0", "1.0.0", "2.0.0rc10", "2.0.0-rc2", "2.0.0.post1", "1.0", "0.9.0"]
    assert sorted(versions, key=release_key) == [
        "0.9.0-bad", "0.9.0", "1.0.0", "1.0", "2.0.0-rc2", "2.0.0rc10", "2.0.0", "2.0.0.post1", "10.0.0"]
    assert [is_release(v) for v in ("2.0.0rc1", "0.9.0-bad", "2.0.0.post1", "1.0")] == [False, False, True, True]


def test_latest_prefers_the_newest_release(zoo: Path) -> None:
    repository = ModelRepository(zoo)
    assert "0.9.0-bad" in repository.versions("shapes")
    assert repository.latest("shapes") == "2.0.1"


def test_verified_artifact_checks_the_sha256(repo: ModelRepository) -> None:
    entry = repo.get("shapes", "1.0.0")
    assert repo.verified_artifact(entry) == entry.artifact
    with entry.artifact.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="sha256"):
        repo.verified_artifact(entry)
    entry.artifact.unlink()
    with pytest.raises(RepositoryError, match="missing"):
        repo.verified_artifact(entry)


@pytest.mark.parametrize(
    ("model", "version", "reason"),
    [
        ("nothing", "1.0.0", "not found"),
        ("shapes", "9.9.9", "not found"),
        ("../shapes", "1.0.0", "invalid model name"),
        ("shapes", "../1.0.0", "invalid version name"),
    ],
)
def test_unknown_or_hostile_names_are_refused(repo: ModelRepository, model: str, version: str, reason: str) -> None:
    with pytest.raises(RepositoryError, match=reason):
        repo.get(model, version)


def test_a_manifest_that_lies_about_its_identity_is_refused(repo: ModelRepository) -> None:
    shutil.copytree(repo.root / "shapes" / "1.0.0", repo.root / "shapes" / "3.0.0")
    with pytest.raises(RepositoryError, match=r"manifest names shapes/1\.0\.0"):
        repo.get("shapes", "3.0.0")


def test_a_corrupt_manifest_is_refused(repo: ModelRepository) -> None:
    (repo.root / "shapes" / "1.0.0" / "manifest.json").write_text('{"name": "shapes"')
    with pytest.raises(RepositoryError, match="invalid manifest"):
        repo.get("shapes", "1.0.0")
