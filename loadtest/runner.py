"""The load itself: an open loop at a rate or a closed loop at a concurrency, every job recorded.

Open loop: jobs are published on a schedule (Poisson arrivals or fixed spacing) whatever the
system does, so a slow system builds a queue and latency shows it. Closed loop: `concurrency`
lanes each publish a job and wait for its result (at most `job_timeout_s`) before the next.
Either stops after `duration_s` or `jobs`, whichever comes first; then `drain` waits up to
`grace_s` for the results still out, and whatever has none by then is lost.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from control.client import Client, NoRoute
from loadtest.records import Accountant, JobRecord
from schemas.jobs import InlineImage, Job

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


@dataclass
class LoadShape:
    model: str
    images: list[Path]
    rate: float | None = None  # jobs/s: open loop
    concurrency: int | None = None  # jobs in flight: closed loop (the default, at 4)
    duration_s: float | None = None
    jobs: int | None = None
    arrival: Literal["poisson", "fixed"] = "poisson"
    deadline_s: float | None = None  # each job's deadline: answered `expired` when missed
    job_timeout_s: float = 30.0  # closed loop: a lane stops waiting for a result after this
    grace_s: float = 10.0  # after the load: how long results still out are waited for
    settle_s: float = 0.5  # after the last answer: keep listening for duplicates this long
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("give a rate (open loop) or a concurrency (closed loop), not both")
        if self.rate is None and self.concurrency is None:
            self.concurrency = 4
        if self.rate is not None and self.rate <= 0:
            raise ValueError("the rate must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("the concurrency must be at least 1")
        if self.duration_s is None and self.jobs is None:
            self.duration_s = 10.0
        if not self.images:
            raise ValueError("no images to submit")

    @property
    def loop(self) -> str:
        return f"open loop at {self.rate:g} jobs/s ({self.arrival})" if self.rate else \
            f"closed loop at concurrency {self.concurrency}"


def find_images(directory: Path) -> list[Path]:
    """The images directly in a directory (or the one file given), sorted by name."""
    if directory.is_file():
        return [directory]
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no .png/.jpg/.webp images in {directory}")
    return images


class Runner:
    def __init__(
        self, client: Client, accountant: Accountant, shape: LoadShape, *,
        console: Console | None = None, show_progress: bool = True, run_id: str | None = None,
    ) -> None:
        self.client = client
        self.accountant = accountant
        self.shape = shape
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self._images = [(p.name, p.read_bytes()) for p in shape.images]
        self._next = 0
        self.no_route = False  # the broker had no queue for the model: the load stops at once
        self.stop_requested = False  # `stop()`: no job is submitted after this
        self._waiters: dict[str, asyncio.Future[None]] = {}
        accountant.on_answer = self._answered

    @property
    def submitted(self) -> int:
        return self._next

    def progress(self) -> float:
        """How far the load has got, 0 to 1 (by time or by jobs, whichever is further)."""
        if self.started_at is None:
            return 0.0
        if self.stopped_at is not None:
            return 1.0
        parts = [0.0]
        if self.shape.duration_s:
            parts.append((time.monotonic() - self.started_at) / self.shape.duration_s)
        if self.shape.jobs:
            parts.append(self._next / self.shape.jobs)
        return min(1.0, max(parts))

    async def run(self) -> None:
        """Submit the whole load (showing a progress bar); returns when the last job is published."""
        self.started_at = time.monotonic()
        ticker = asyncio.create_task(self._show_progress())
        try:
            if self.shape.rate is not None:
                await self._open_loop(self.shape.rate)
            else:
                assert self.shape.concurrency is not None
                await asyncio.gather(*(self._lane() for _ in range(self.shape.concurrency)))
        finally:
            self.stopped_at = time.monotonic()
            await ticker

    def stop(self) -> None:
        """End the load early (something running beside it is done): nothing more is submitted."""
        self.stop_requested = True

    async def drain(self) -> None:
        """Wait up to `grace_s` for results still out, then `settle_s` more for late duplicates."""
        deadline = time.monotonic() + self.shape.grace_s
        while self.accountant.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.shape.settle_s)
        self.accountant.finish()

    def _done(self) -> bool:
        assert self.started_at is not None
        if self.no_route or self.stop_requested:
            return True
        if self.shape.jobs is not None and self._next >= self.shape.jobs:
            return True
        return self.shape.duration_s is not None and time.monotonic() - self.started_at >= self.shape.duration_s

    def _claim(self) -> int | None:
        if self._done():
            return None
        self._next += 1
        return self._next - 1

    async def _open_loop(self, rate: float) -> None:
        assert self.started_at is not None
        rng = random.Random(self.shape.seed)
        next_at = self.started_at
        publishing: set[asyncio.Task[JobRecord]] = set()
        while True:
            if (delay := next_at - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if (index := self._claim()) is None:
                break
            task = asyncio.create_task(self._submit(index))
            publishing.add(task)
            task.add_done_callback(publishing.discard)
            next_at += rng.expovariate(rate) if self.shape.arrival == "poisson" else 1.0 / rate
        await asyncio.gather(*publishing)

    async def _lane(self) -> None:
        while (index := self._claim()) is not None:
            record = await self._submit(index)
            if record.status != "pending":
                continue
            waiter = self._waiters.setdefault(record.job_id, asyncio.get_running_loop().create_future())
            timeout = self.shape.job_timeout_s
            if self.shape.duration_s is not None:
                assert self.started_at is not None
                timeout = min(timeout, max(0.0, self.started_at + self.shape.duration_s - time.monotonic()))
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                pass  # still pending: the drain gives it its grace, then it is lost
            finally:
                self._waiters.pop(record.job_id, None)

    def _answered(self, record: JobRecord) -> None:
        waiter = self._waiters.get(record.job_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _submit(self, index: int) -> JobRecord:
        name, data = self._images[index % len(self._images)]
        job_id = f"{self.run_id}-{index:07d}"
        now = datetime.now(UTC)
        job = Job(
            job_id=job_id, model=self.shape.model, image=InlineImage(data=data), submitted_at=now,
            deadline=now + timedelta(seconds=self.shape.deadline_s) if self.shape.deadline_s is not None else None,
        )
        body = job.model_dump_json(exclude_none=True).encode()
        record = self.accountant.submitted(job_id, name, self.shape.model)
        try:
            await self.client.publish_raw(body, model=self.shape.model, job_id=job_id)
        except NoRoute:
            self.no_route = True
            self.accountant.publish_failed(job_id)
        return record

    async def _show_progress(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[line]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, disable=not self.show_progress) as bar:
            task = bar.add_task(f"load ({self.shape.loop})", total=100, line="")
            while True:
                counts = self.accountant.counts()
                line = (f"submitted {counts.submitted} · answered {counts.answered} · "
                        f"in flight {counts.pending} · failed {counts.failed}")
                bar.update(task, completed=100 * self.progress(), line=line)
                if self.stopped_at is not None:
                    break
                await asyncio.sleep(0.25)
