"""Admission by decoded pixels: what bounds a worker's memory is pixels, not messages.

Prefetch counts messages; 32 jobs of 40-megapixel photos would decode to 3.8 GB at once. Each
job therefore holds its image's pixel count (read from the header, before anything is decoded)
from decoding until its inference is done. Jobs are admitted in arrival order, so a big image is
not starved by a stream of small ones; one image larger than the whole budget is admitted alone.
"""

from __future__ import annotations

import asyncio
from collections import deque


class PixelBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a pixel budget is at least one pixel")
        self.limit = limit
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def hold(self, pixels: int) -> Held:
        """`async with budget.hold(pixels):` the pixels are held inside, released on the way out."""
        return Held(self, pixels)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def try_acquire(self, pixels: int) -> bool:
        """Take room for optional work only if it is free now and nobody waits for it; `release` after."""
        if self._waiting or self.held + pixels > self.limit:
            return False
        self.held += pixels
        return True

    def release(self, pixels: int) -> None:
        self.held -= pixels
        self._admit()

    async def acquire(self, pixels: int) -> None:
        """Wait for room, in arrival order; `release` after."""
        if not self._waiting and self._fits(pixels):
            self.held += pixels
            return
        admitted = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, admitted))
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled():  # admitted as it was cancelled
                self.release(pixels)
            else:
                self._waiting.remove((pixels, admitted))
                self._admit()  # it may have been the one holding the queue up
            raise

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            pixels, admitted = self._waiting.popleft()
            self.held += pixels
            admitted.set_result(None)

    def _fits(self, pixels: int) -> bool:
        return self.held == 0 or self.held + pixels <= self.limit


class Held:
    """`PixelBudget.hold`'s context manager. A class, not an `asynccontextmanager`: every job
    enters one, and the generator behind that costs several times more on the job path."""

    __slots__ = ("_budget", "_pixels")

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self._budget = budget
        self._pixels = pixels

    async def __aenter__(self) -> None:
        await self._budget.acquire(self._pixels)

    async def __aexit__(self, *exc_info: object) -> None:
        self._budget.release(self._pixels)
