"""The artifact source policy: every form of escaping a source, malformed URIs, symlinks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from worker.config import WorkerSettings
from worker.runtime.sources import SourcePolicy, SourceRefused

HTTP = "http://127.0.0.1:8123/models/"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """allowed/ (a source) with a model, outside/ and allowed-evil/ beside it, links between them."""
    for d in ("allowed/shapes/1.0.0", "outside/shapes/1.0.0", "allowed-evil/shapes/1.0.0"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "model.pt").write_bytes(d.encode())
    (tmp_path / "allowed/out-link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "allowed/in-link").symlink_to(tmp_path / "allowed/shapes", target_is_directory=True)
    (tmp_path / "allowed/shapes/1.0.0/escape.pt").symlink_to(tmp_path / "outside/shapes/1.0.0/model.pt")
    (tmp_path / "link-to-allowed").symlink_to(tmp_path / "allowed", target_is_directory=True)
    return tmp_path


@pytest.fixture
def policy(tree: Path) -> SourcePolicy:
    return SourcePolicy([f"file://{tree}/allowed", HTTP])


@pytest.mark.parametrize("relative", [
    "allowed/shapes/1.0.0/model.pt",
    "allowed/in-link/1.0.0/model.pt",  # a link that stays inside the source
    "allowed/shapes/x/../1.0.0/model.pt",  # `..` that stays inside, once resolved
    "allowed/shapes/1.0.0/mod%65l.pt",  # any percent-encoding of the same name
])
def test_file_uris_inside_the_source_are_allowed_and_read_through_the_resolved_path(
    policy: SourcePolicy, tree: Path, relative: str
) -> None:
    location = policy.check(f"file://{tree}/{relative}")
    assert location.path == (tree / "allowed/shapes/1.0.0/model.pt").resolve()
    assert policy.check(f"file://localhost{tree}/{relative}") == location


@pytest.mark.parametrize("relative", [
    "allowed/../outside/shapes/1.0.0/model.pt",
    "allowed/%2e%2e/outside/shapes/1.0.0/model.pt",
    "allowed/%2E%2e/outside/shapes/1.0.0/model.pt",
    "allowed/.%2e/outside/shapes/1.0.0/model.pt",
    "allowed/shapes/..%2f..%2f../outside/shapes/1.0.0/model.pt",
    "allowed-evil/shapes/1.0.0/model.pt",  # a sibling whose name starts with the source's
    "allowed/out-link/shapes/1.0.0/model.pt",  # a directory link inside pointing out
    "allowed/shapes/1.0.0/escape.pt",  # a file link inside pointing out
    "outside/shapes/1.0.0/model.pt",
])
def test_file_uris_that_leave_the_source_are_refused(policy: SourcePolicy, tree: Path, relative: str) -> None:
    with pytest.raises(SourceRefused, match="not under an allowed artifact source"):
        policy.check(f"file://{tree}/{relative}")


def test_a_source_given_through_a_symlink_is_the_directory_it_names(tree: Path) -> None:
    policy = SourcePolicy([f"file://{tree}/link-to-allowed/"])
    assert policy.check(f"file://{tree}/allowed/shapes/1.0.0/model.pt").path.name == "model.pt"
    assert policy.check(f"file://{tree}/link-to-allowed/shapes/1.0.0/model.pt").path.parent.parent.parent == (
        tree / "allowed").resolve()
    with pytest.raises(SourceRefused, match="not under"):
        policy.check(f"file://{tree}/link-to-allowed/../outside/shapes/1.0.0/model.pt")


@pytest.mark.parametrize(("uri", "canonical"), [
    (f"{HTTP}shapes/1.0.0/model.pt", f"{HTTP}shapes/1.0.0/model.pt"),
    ("HTTP://127.0.0.1:8123/models/shapes/model.pt", f"{HTTP}shapes/model.pt"),  # scheme case
    (f"{HTTP}shapes/my%20model.pt", f"{HTTP}shapes/my%20model.pt"),
    (f"{HTTP}shapes/%6d%6fdel.pt", f"{HTTP}shapes/model.pt"),  # re-encoded from what was checked
])
def test_http_uris_inside_the_source_are_allowed_and_fetched_as_checked(
    policy: SourcePolicy, uri: str, canonical: str
) -> None:
    assert policy.check(uri).url == canonical


def test_default_ports_and_host_case_are_the_same_place() -> None:
    policy = SourcePolicy(["https://Models.Example.com/zoo"])
    assert policy.check("https://models.example.com:443/zoo/a/model.pt").url == "https://models.example.com/zoo/a/model.pt"
    with pytest.raises(SourceRefused, match="not under"):
        policy.check("http://models.example.com/zoo/a/model.pt")  # another scheme is another place


@pytest.mark.parametrize(("uri", "reason"), [
    (f"{HTTP}../secret/model.pt", r"'\.\.'"),
    (f"{HTTP}%2e%2e/secret/model.pt", r"'\.\.'"),
    (f"{HTTP}shapes/%2E%2E/%2e%2e/secret/model.pt", r"'\.\.'"),
    (f"{HTTP}shapes/./model.pt", r"'\.'"),
    (f"{HTTP}shapes/..%2f..%2fsecret/model.pt", "encoded '/'"),
    (f"{HTTP}shapes%2F..%2F..%2Fsecret/model.pt", "encoded '/'"),
    (f"{HTTP}shapes/..%5c..%5csecret/model.pt", "encoded '/'"),
    (f"{HTTP}shapes/..\\..\\secret/model.pt", r"'\\'"),
    (f"{HTTP}shapes//model.pt", "empty segments"),
    ("http://127.0.0.1:8123/models-evil/model.pt", "not under"),  # segment boundary
    ("http://127.0.0.1:8123/modelsx", "not under"),
    ("http://127.0.0.1:8124/models/model.pt", "not under"),  # another port
    ("https://127.0.0.1:8123/models/model.pt", "not under"),  # another scheme
    ("http://localhost:8123/models/model.pt", "not under"),  # hosts compare exactly
    ("http://127.0.0.1:8123@evil.example/models/model.pt", "user info"),
    ("http://user:pw@127.0.0.1:8123/models/model.pt", "user info"),
    (f"{HTTP}model.pt?x=../../secret", "query or fragment"),
    (f"{HTTP}model.pt#frag", "query or fragment"),
])
def test_http_uris_that_leave_the_source_or_hide_where_they_go_are_refused(
    policy: SourcePolicy, uri: str, reason: str
) -> None:
    with pytest.raises(SourceRefused, match=reason):
        policy.check(uri)


@pytest.mark.parametrize(("uri", "reason"), [
    ("file:///srv/models/model\x00.pt", "control character, a NUL byte"),
    ("file:///srv/models/model%00.pt", "NUL byte"),
    (f"{HTTP}model%00.pt", "NUL byte"),
    (f"{HTTP}model\n.pt", "control character"),
    (f"{HTTP}my model.pt", "raw space"),
    (f"{HTTP}model%zz.pt", "bad percent-encoding"),
    (f"{HTTP}model%2.pt", "bad percent-encoding"),
    (f"{HTTP}model%", "bad percent-encoding"),
    (f"{HTTP}model%ff%fe.pt", "not UTF-8"),
    ("http://[::1/models/model.pt", "not a parseable URI"),
    ("http://127.0.0.1:99999/models/model.pt", "not a parseable URI"),
    ("http://127.0.0.1:port/models/model.pt", "not a parseable URI"),
    ("http:///models/model.pt", "names no host"),
    ("ftp://127.0.0.1/models/model.pt", "file, http, https only"),
    ("models/model.pt", "file, http, https only"),
    ("", "non-empty"),
    ("file://otherhost/srv/models/model.pt", "names no host"),
    ("file:relative/model.pt", "absolute path"),
])
def test_malformed_uris_are_refused_with_a_reason(policy: SourcePolicy, uri: str, reason: str) -> None:
    with pytest.raises(SourceRefused, match=reason):
        policy.check(uri)


def test_no_uri_raises_anything_but_a_refusal(policy: SourcePolicy, tree: Path) -> None:
    """Garbage from the characters that matter to parsers: refused or allowed, never a crash."""
    alphabet = ["/", ".", "..", "%", "%2e", "%2f", "%00", "%zz", "%ff", "\\", ":", "@", "[", "]", "?", "#", "\x00",
                " ", "\n", "é", "a", "1", "//", "file://", "http://", "127.0.0.1", ":8123", str(tree)]
    rng = random.Random(0)
    allowed = 0
    for _ in range(3000):
        uri = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        for candidate in (uri, HTTP + uri, f"file://{tree}/allowed/{uri}"):
            try:
                policy.check(candidate)
                allowed += 1
            except SourceRefused:
                pass
    assert allowed > 0  # the generator reaches the allowed side too


@pytest.mark.parametrize("source", ["ftp://host/models", "http://host/../models", "file://host/x", "http://h/%zz"])
def test_a_malformed_source_stops_the_worker_at_start(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="invalid artifact source"):
        SourcePolicy([source])
    monkeypatch.setenv("HOTSWAP_ARTIFACT_SOURCES", f"file:///srv/models,{source}")
    with pytest.raises(ValueError, match="invalid artifact source"):
        WorkerSettings()
