"""CPU and wall time by step of the job path: the bench's profile mode (`HOTSWAP_PROFILE=1`).

Off by default, where a step costs one attribute read. On, each step adds the CPU time its thread
spent inside it (`time.thread_time_ns`) and its wall time: the difference is what the thread waited
inside the step, for a core or for the GIL (on a CPU of its own, the inference thread waits only
for the GIL: what sharing a process with the event loop costs the model).
Only synchronous stretches are timed: on the event loop a step never spans an `await`, since the
loop would run other jobs' work inside it. What the loop thread spends outside every step (asyncio,
aio-pika, aiormq: the transport, the hand-offs, scheduling) is its total less its steps; totals by
thread come from the threads' own CPU clocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

_OFF: AbstractContextManager[None] = nullcontext()


class StepProfile:
    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        #: `role/step` → [CPU ns, wall ns, count] so far.
        self._totals: dict[str, list[int]] = {}

    def step(self, name: str) -> AbstractContextManager[None]:
        """Time the block's CPU as step `name` (it must not await)."""
        return self._timed(name) if self.enabled else _OFF

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        started, wall_started = time.thread_time_ns(), time.perf_counter_ns()
        try:
            yield
        finally:
            spent, wall = time.thread_time_ns() - started, time.perf_counter_ns() - wall_started
            key = f"{_role(threading.current_thread())}/{name}"
            with self._lock:
                totals = self._totals.setdefault(key, [0, 0, 0])
                totals[0] += spent
                totals[1] += wall
                totals[2] += 1

    def snapshot(self) -> dict[str, Any]:
        """Every step's CPU and wall seconds and count so far (keyed `role/step`, the role of the
        thread it ran in), and every live thread's CPU seconds by role."""
        with self._lock:
            steps = {name: {"cpu_s": cpu / 1e9, "wall_s": wall / 1e9, "count": count}
                     for name, (cpu, wall, count) in self._totals.items()}
        return {"enabled": self.enabled, "steps": steps, "threads": thread_cpu_by_role()}


def thread_cpu_by_role() -> dict[str, float]:
    """CPU seconds of the process's Python threads, summed by role: an executor's threads are named
    `<prefix>_<n>`, so `decode_0` and `decode_1` are `decode`; the main thread runs the event loop."""
    roles: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        role = _role(thread)
        try:
            spent = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, ProcessLookupError):  # the thread ended meanwhile
            continue
        roles[role] = roles.get(role, 0.0) + spent
    return roles


def _role(thread: threading.Thread) -> str:
    return "loop" if thread is threading.main_thread() else thread.name.rsplit("_", 1)[0]


#: The process's one profile: the worker enables it from its settings; backends and the job path time into it.
STEPS = StepProfile()
