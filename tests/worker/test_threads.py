"""The loop's threads (`worker.threads`): results, errors and cancellation come back as an executor's would."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from worker.threads import LoopThreads


async def test_each_call_gets_its_own_result_from_a_named_thread() -> None:
    with LoopThreads(2, "decode") as threads:
        names = await asyncio.gather(*(threads.run(lambda i=i: (i, threading.current_thread().name))
                                       for i in range(500)))
    assert [i for i, _ in names] == list(range(500))
    assert {name for _, name in names} <= {"decode_0", "decode_1"}


async def test_each_thread_runs_the_initializer_once_before_its_first_call() -> None:
    ready: list[str] = []
    with LoopThreads(2, "inference", initializer=lambda: ready.append(threading.current_thread().name)) as threads:
        initialized = await asyncio.gather(*(threads.run(lambda: threading.current_thread().name in ready)
                                             for _ in range(50)))
    assert sorted(ready) == ["inference_0", "inference_1"]
    assert all(initialized)  # no call ran before its own thread's initializer


async def test_an_exception_reaches_the_awaiting_task_and_the_threads_go_on() -> None:
    def fail(message: str) -> None:
        raise ValueError(message)

    with LoopThreads(1, "decode") as threads:
        with pytest.raises(ValueError, match="bad pixels"):
            await threads.run(fail, "bad pixels")
        with pytest.raises(RuntimeError, match="StopIteration"):  # a Future refuses StopIteration itself
            await threads.run(next, iter(()))
        assert await threads.run(sum, (1, 2, 3)) == 6


async def test_a_cancelled_wait_drops_its_result_and_the_others_still_arrive() -> None:
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "late"

    with LoopThreads(1, "inference") as threads:
        waiting = asyncio.ensure_future(threads.run(slow))
        queued = threads.run(str.upper, "next")
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        waiting.cancel()
        assert await queued == "NEXT"  # the one behind it ran, after the cancelled one finished
    assert waiting.cancelled()


async def test_shutdown_cancels_what_has_not_started() -> None:
    started, gate = threading.Event(), threading.Event()

    def blocked() -> bool:
        started.set()
        return gate.wait(5)

    threads = LoopThreads(1, "inference")
    running = threads.run(blocked)
    queued = [threads.run(str, n) for n in range(3)]
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    threads.shutdown()
    gate.set()
    assert await running is True
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="shut down"):
        threads.run(str, 1)
