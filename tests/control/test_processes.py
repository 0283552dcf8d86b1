"""Worker processes started from Python (`control.processes`): what their start is noticed by."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control.processes import READY_LINE

if TYPE_CHECKING:
    from conftest import StartWorker


def test_a_started_worker_has_logged_the_line_its_readiness_is_noticed_by(start_worker: StartWorker) -> None:
    worker = start_worker()
    assert worker.get("/readyz")["ready"]
    # Without that line, a start is noticed only by asking /readyz every 0.2 s: benchmark 7 would
    # time the poll's period along with the worker's start.
    assert READY_LINE.search(worker.log_path.read_text()), "the worker no longer logs 'worker <id> ready'"
