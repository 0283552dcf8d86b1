"""The backend registry is keyed by backend and task: a backend asked for a task it does not serve
is refused, naming the backend, the task and the tasks it does serve, before anything is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from schemas.manifest import Task
from worker.runtime.backend import BackendError, create_backend, registered

REPO = Path(__file__).resolve().parents[3]


def _served() -> dict[str, set[str]]:
    served: dict[str, set[str]] = {}
    for backend, task in registered():
        served.setdefault(backend, set()).add(task)
    return served


def _unserved() -> list[tuple[str, str]]:
    return [(backend, task) for backend, tasks in sorted(_served().items())
            for task in get_args(Task) if task not in tasks]


def test_every_backend_leaves_some_task_unserved() -> None:
    """Else the refusal below would be tested on nothing."""
    assert {"ultralytics", "modelscope", "mtcnn", "trivial"} <= set(_served())
    assert {backend for backend, _ in _unserved()} == set(_served())


@pytest.mark.parametrize(("backend", "task"), _unserved(), ids=[f"{b}-{t}" for b, t in _unserved()])
def test_a_task_the_backend_does_not_serve_is_refused_naming_what_it_serves(backend: str, task: str) -> None:
    with pytest.raises(BackendError) as refused:
        create_backend(backend, "cpu", task=task)
    message = str(refused.value)
    assert f"backend {backend!r} does not serve task {task!r}" in message, message
    assert all(served in message for served in _served()[backend]), message


def test_refused_before_the_backend_is_imported() -> None:
    """The refusal reads the registry only: no framework is imported for a task nobody will serve."""
    code = (
        "import sys\n"
        "from worker.runtime.backend import BackendError, create_backend\n"
        "for backend, task in (('modelscope', 'detect'), ('mtcnn', 'segment'), ('ultralytics', 'human-parsing')):\n"
        "    try:\n"
        "        create_backend(backend, 'cpu', task=task)\n"
        "    except BackendError as exc:\n"
        "        print(exc)\n"
        "print(sorted(m for m in ('modelscope', 'facenet_pytorch', 'ultralytics') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *refusals, imported = done.stdout.strip().splitlines()
    assert len(refusals) == 3 and all("does not serve task" in line for line in refusals), refusals
    assert imported == "[]", imported


def test_an_unknown_backend_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(BackendError, match=r"unknown backend 'tensorflow'; known: .*modelscope.*ultralytics"):
        create_backend("tensorflow", "cpu", task="detect")
