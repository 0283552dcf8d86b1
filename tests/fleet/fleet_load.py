"""Load for the failover tests: jobs at a fixed concurrency, each answer timed, and what a fault
did to them: every job answered once (none lost, failed or duplicated), the throughput dip and
the time to recover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from control.client import Client
from schemas.jobs import JobResult


@dataclass
class Load:
    client: Client
    images: list[Path]
    jobs: int
    concurrency: int = 16
    model: str = "trivial"
    #: (monotonic time answered, result), in arrival order.
    answered: list[tuple[float, JobResult]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    submitted: int = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._lane() for _ in range(self.concurrency)))

    async def _lane(self) -> None:
        while self.submitted < self.jobs:
            image = self.images[self.submitted % len(self.images)]
            self.submitted += 1
            try:
                result = await self.client.submit(image, model=self.model, timeout_s=90)
            except Exception as exc:  # a timeout is a lost job: the test reports it
                self.errors.append(exc)
                continue
            self.answered.append((time.monotonic(), result))

    def stop(self) -> None:
        """Submit no more: the lanes end once their last job is answered."""
        self.jobs = self.submitted

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        await self.wait_until(lambda: len(self.answered) >= count, f"{count} answers", timeout_s)

    async def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"no {what} in {timeout_s:.0f} s: {len(self.answered)} answers"
            await asyncio.sleep(0.02)

    def first_answer_by(self, worker_id: str, after: float) -> float | None:
        """When `worker_id` first answered after `after` (monotonic), or None."""
        return next((at for at, r in self.answered if at > after and r.worker_id == worker_id), None)

    def assert_every_job_answered_once(self) -> list[JobResult]:
        assert not self.errors, f"{len(self.errors)} jobs lost, e.g. {self.errors[0]!r}"
        results = [r for _, r in self.answered]
        assert len(results) == self.jobs, f"{len(results)} answers to {self.jobs} jobs"
        assert len({r.job_id for r in results}) == self.jobs, "a job was answered twice"
        failed = [r for r in results if r.status != "ok"]
        assert not failed, f"{len(failed)} failed jobs, e.g. {failed[0].error}"
        return results

    def answered_after(self, moment: float) -> list[JobResult]:
        return [r for at, r in self.answered if at > moment]


@dataclass(frozen=True)
class Dip:
    """What a fault at `fault_at` did to throughput, measured from the answers' arrival times."""

    steady_per_s: float  # answers per second over the `window_s` before the fault
    worst_per_s: float  # the worst `window_s` window from the fault on
    longest_stall_s: float  # the longest wait for the next answer from the fault on
    recovered_after_s: float  # fault → the answer that ended that stall: answers flow again

    def line(self, what: str) -> str:
        return (f"{what}: steady {self.steady_per_s:.0f} jobs/s; worst 1-s window {self.worst_per_s:.0f} jobs/s; "
                f"no answer for {self.longest_stall_s:.2f} s; answers flowing again {self.recovered_after_s:.2f} s "
                "after the kill")


def measure_dip(times: list[float], fault_at: float, window_s: float = 1.0, step_s: float = 0.05) -> Dip:
    steady = sum(fault_at - window_s <= t < fault_at for t in times) / window_s
    after = sorted(t for t in times if t >= fault_at)
    if not after:
        return Dip(steady, 0.0, float("inf"), float("inf"))
    stall, ended_at = max((b - a, b) for a, b in zip([fault_at, *after], after, strict=False))
    rates = []
    start = fault_at
    while start + window_s <= after[-1]:
        rates.append(sum(start <= t < start + window_s for t in after) / window_s)
        start += step_s
    return Dip(steady, min(rates, default=0.0), stall, ended_at - fault_at)
