"""What handing a call to a thread costs the event loop: `run_in_executor` against `worker.threads`.

    python -m loadtest.bench_handoff [--calls 20000] [--window 32] [--rounds 3]

Each side runs `calls` calls of a function that does nothing, `window` in flight at a time (as
a worker's prefetch keeps them), on two threads, and prints the process's CPU per call; the sides
alternate, `rounds` times each. The work itself is nil, so what is measured is the hand-off: the
futures, the queue, the wake-ups of the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from worker.threads import LoopThreads


def _nothing(value: int) -> int:
    return value


async def _cpu_us_per_call(start: Callable[[int], Awaitable[int]], calls: int, window: int) -> float:
    slots = asyncio.Semaphore(window)

    async def one(value: int) -> None:
        async with slots:
            await start(value)

    cpu = time.process_time()
    await asyncio.gather(*(one(n) for n in range(calls)))
    return 1e6 * (time.process_time() - cpu) / calls


async def _executor(calls: int, window: int) -> float:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(2, thread_name_prefix="decode") as executor:
        return await _cpu_us_per_call(lambda n: loop.run_in_executor(executor, _nothing, n), calls, window)


async def _loop_threads(calls: int, window: int) -> float:
    with LoopThreads(2, "decode") as threads:
        return await _cpu_us_per_call(lambda n: threads.run(_nothing, n), calls, window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        executor = asyncio.run(_executor(args.calls, args.window))
        threads = asyncio.run(_loop_threads(args.calls, args.window))
        print(f"CPU µs per call: run_in_executor {executor:.1f}, LoopThreads {threads:.1f} "
              f"(ratio {threads / executor:.2f})", flush=True)


if __name__ == "__main__":
    main()
