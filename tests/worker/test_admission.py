"""Admission by decoded pixels: in arrival order, never over the budget but for one image alone."""

from __future__ import annotations

import asyncio

import pytest

from worker.admission import PixelBudget


async def holding(budget: PixelBudget, pixels: int, log: list[str], name: str, release: asyncio.Event) -> None:
    async with budget.hold(pixels):
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_images_within_the_budget_go_at_once_and_the_rest_wait_in_order() -> None:
    log: list[str] = []
    budget, release = PixelBudget(100), asyncio.Event()
    tasks = [asyncio.create_task(holding(budget, pixels, log, name, release))
             for name, pixels in (("a", 40), ("b", 40), ("big", 60), ("small", 10))]
    await settle()
    # "small" would fit beside a and b, but "big" came first: it is not passed.
    assert log == ["a", "b"] and budget.held == 80 and budget.waiting == 2
    release.set()
    await asyncio.gather(*tasks)
    assert log == ["a", "b", "big", "small"] and budget.held == 0 and budget.waiting == 0


async def test_an_image_over_the_whole_budget_is_admitted_alone() -> None:
    log: list[str] = []
    budget, release = PixelBudget(100), asyncio.Event()
    first = asyncio.create_task(holding(budget, 10, log, "first", release))
    await settle()
    huge = asyncio.create_task(holding(budget, 500, log, "huge", asyncio.Event()))
    await settle()
    assert log == ["first"]
    release.set()
    await first
    await settle()
    assert log == ["first", "huge"] and budget.held == 500
    huge.cancel()
    with pytest.raises(asyncio.CancelledError):
        await huge
    assert budget.held == 0


async def test_a_cancelled_waiter_lets_the_next_one_in() -> None:
    log: list[str] = []
    budget, release = PixelBudget(100), asyncio.Event()
    holder = asyncio.create_task(holding(budget, 50, log, "holder", release))
    await settle()
    blocked = asyncio.create_task(holding(budget, 80, log, "blocked", release))
    behind = asyncio.create_task(holding(budget, 30, log, "behind", release))
    await settle()
    assert log == ["holder"] and budget.waiting == 2
    blocked.cancel()  # e.g. the worker is stopping; the job behind it fits now
    await settle()
    assert log == ["holder", "behind"] and budget.held == 80 and budget.waiting == 0
    release.set()
    await asyncio.gather(holder, behind)
    assert budget.held == 0
