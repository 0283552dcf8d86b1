"""The backend registry takes its entries from outside: the built-in table, entry points of
`hotswap.backends`, `register_backend`; and imports a backend's module only when it is asked for."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from worker.runtime import backend
from worker.runtime.backend import ENTRY_POINT_GROUP, BackendEntry, BackendError, create_backend, register_backend

#: A backend of another package: its class in one module (which would import a framework), its
#: entry in a light one, as an entry point's target should be.
OUTSIDE_CLASS = '''
class OutsideBackend:
    def __init__(self, device, loader):
        self.device, self.loader = device, loader

    def load(self, artifact, manifest): ...

    def warm_up(self): ...

    def predict(self, images, params):
        return []

    def release(self): ...


class OtherOutsideBackend(OutsideBackend): ...
'''
OUTSIDE_ENTRY = '''
from worker.runtime.backend import BackendEntry

ENTRY = BackendEntry("outside", frozenset({"classify"}), "outside_backend:OutsideBackend")
BOTH = (ENTRY, BackendEntry("outside-too", frozenset({"detect", "pose"}), "outside_backend:OutsideBackend"))
NOT_AN_ENTRY = "outside_backend:OutsideBackend"
'''
MODULES = ("outside_backend", "outside_entries")


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    """A registry as a fresh worker has it, with another package's modules on the path; the entry
    points the registry finds are the list returned (empty unless a test adds to it)."""
    (tmp_path / "outside_backend.py").write_text(OUTSIDE_CLASS)
    (tmp_path / "outside_entries.py").write_text(OUTSIDE_ENTRY)
    monkeypatch.syspath_prepend(tmp_path)
    found: list[EntryPoint] = []
    monkeypatch.setattr(backend, "_entry_points", lambda: found)
    monkeypatch.setattr(backend, "_REGISTERED", {})
    monkeypatch.setattr(backend, "_FOUND", None)
    monkeypatch.setattr(backend, "_BROKEN", {})
    yield found
    for name in MODULES:
        sys.modules.pop(name, None)


def test_the_built_ins_are_found_without_importing_a_framework() -> None:
    probe = ("import sys; from worker.runtime.backend import registered; found = registered(); "
             "print(sorted({b for b, _ in found}), len(found), "
             "sorted(m for m in ('torch', 'ultralytics', 'cv2', 'modelscope', 'facenet_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['modelscope', 'mtcnn', 'trivial', 'ultralytics'] 8 []", out


def test_a_backend_registered_in_code_is_imported_when_asked_for(outside: list[EntryPoint]) -> None:
    register_backend(BackendEntry("outside", frozenset({"classify", "pose"}), "outside_backend:OutsideBackend"))
    assert "outside_backend" not in sys.modules and ("outside", "pose") in backend.registered()
    made = create_backend("outside", "cpu", task="classify")
    assert type(made).__name__ == "OutsideBackend" and vars(made)["device"] == "cpu"
    # A later entry for the same backend and task wins; the built-ins are still there.
    register_backend(BackendEntry("outside", frozenset({"classify"}), "outside_backend:OtherOutsideBackend"))
    assert type(create_backend("outside", "cpu", task="classify")).__name__ == "OtherOutsideBackend"
    assert type(create_backend("outside", "cpu", task="pose")).__name__ == "OutsideBackend"
    assert backend.registered()["trivial", "detect"].factory == "worker.runtime.trivial_backend:TrivialBackend"


def test_entry_points_are_read_once_on_first_use_and_a_broken_one_says_so(outside: list[EntryPoint]) -> None:
    outside += [
        EntryPoint("outside", "outside_entries:ENTRY", ENTRY_POINT_GROUP),
        EntryPoint("both", "outside_entries:BOTH", ENTRY_POINT_GROUP),
        EntryPoint("gone", "no_such_package.backends:ENTRY", ENTRY_POINT_GROUP),
        EntryPoint("odd", "outside_entries:NOT_AN_ENTRY", ENTRY_POINT_GROUP),
    ]
    assert "outside_entries" not in sys.modules  # nothing read at import
    found = backend.registered()
    assert {("outside", "classify"), ("outside-too", "detect"), ("outside-too", "pose"),
            ("trivial", "detect")} <= found.keys()
    assert "outside_entries" in sys.modules and "outside_backend" not in sys.modules
    outside.clear()  # read once: what the metadata says later is not read again
    assert backend.registered() == found
    assert type(create_backend("outside-too", "cpu", task="pose")).__name__ == "OutsideBackend"
    with pytest.raises(BackendError) as gone:
        create_backend("gone", "cpu")
    assert "unknown backend 'gone'; known: modelscope, mtcnn, outside, outside-too, trivial, ultralytics" in str(
        gone.value)
    assert ("entry point gone = 'no_such_package.backends:ENTRY' (hotswap.backends) cannot be loaded "
            "(ModuleNotFoundError: No module named 'no_such_package')") in str(gone.value)
    with pytest.raises(BackendError) as odd:
        create_backend("odd", "cpu")
    assert "'outside_entries:NOT_AN_ENTRY' (hotswap.backends) is not a BackendEntry nor a sequence" in str(odd.value)


def test_a_backend_refuses_a_task_it_does_not_serve(outside: list[EntryPoint]) -> None:
    with pytest.raises(BackendError) as refused:
        create_backend("trivial", "cpu", task="pose")
    assert str(refused.value) == "backend 'trivial' does not serve task 'pose'; it serves detect"
    register_backend(BackendEntry("outside", frozenset({"classify", "detect"}), "outside_backend:OutsideBackend"))
    with pytest.raises(BackendError) as refused:
        create_backend("outside", "cpu", task="segment")
    assert str(refused.value) == "backend 'outside' does not serve task 'segment'; it serves classify, detect"
    assert "outside_backend" not in sys.modules  # refused before its module is imported
