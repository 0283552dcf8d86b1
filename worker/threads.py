"""Threads that run blocking calls for the event loop: decoding, and the inference thread.

`loop.run_in_executor` costs the loop about 50 µs of CPU a call (a concurrent Future with its lock
and condition, an asyncio Future chained to it by callbacks, and a wake-up of the loop through its
self-pipe for each result). A job makes one such call to decode and shares one to infer, on a path
whose whole budget is about a millisecond. These threads take work from a `SimpleQueue` and hand
results back in runs: the first result finished while the loop is busy wakes it, later ones join
that wake-up, and the loop settles each run's asyncio futures itself (about 10 µs a call; the
README's Performance section has the measurement).

Like an executor's, a call that has started runs to its end: cancelling the awaiting task only
drops the result.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

_Work = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Done = tuple["asyncio.Future[Any]", bool, Any]  # future, raised, value or exception


class LoopThreads:
    """`threads` threads named `<name>_<n>` (the profile's roles), serving the loop that first calls `run`;
    each calls `initializer` first, as an executor's threads do."""

    def __init__(self, threads: int, name: str, initializer: Callable[[], object] | None = None) -> None:
        if threads < 1:
            raise ValueError("at least one thread")
        self.name = name
        self._initializer = initializer
        self._work: SimpleQueue[_Work | None] = SimpleQueue()
        self._done: deque[_Done] = deque()
        self._done_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Started by the first call, as an executor's are: a worker that never serves starts none.
        # Daemons: a call that never returns (a hung inference) does not hold up the process's exit.
        self._threads = [threading.Thread(target=self._serve, name=f"{name}_{n}", daemon=True) for n in range(threads)]

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` in one of the threads; await the future for its value or its exception."""
        if self._closed:
            raise RuntimeError(f"the {self.name} threads are shut down")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            for thread in self._threads:
                thread.start()
        elif self._loop is not loop:
            raise RuntimeError(f"the {self.name} threads serve another event loop")
        future: asyncio.Future[T] = loop.create_future()
        self._work.put((future, fn, args))
        return future

    def __enter__(self) -> LoopThreads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Start nothing more: work not started is cancelled; what runs finishes, its result dropped."""
        if self._closed:
            return
        self._closed = True
        while not self._work.empty():
            item = self._work.get_nowait()
            if item is not None:
                item[0].cancel()
        for thread in self._threads:
            if thread.is_alive():
                self._work.put(None)  # one each: the thread ends

    def _serve(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (item := self._work.get()) is not None:
            future, fn, args = item
            try:
                done: _Done = (future, False, fn(*args))
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                done = (future, True, exc)
            del item, fn, args  # the arguments (images) are not kept alive while the thread waits
            with self._done_lock:
                wake = not self._done
                self._done.append(done)
            if wake:
                self._wake()

    def _wake(self) -> None:
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._settle)
        except RuntimeError:  # the loop has closed: nobody awaits these results any more
            with self._done_lock:
                self._done.clear()

    def _settle(self) -> None:
        with self._done_lock:
            finished = list(self._done)
            self._done.clear()
        for future, raised, value in finished:
            if future.done():  # cancelled while it ran
                continue
            if not raised:
                future.set_result(value)
            elif isinstance(value, StopIteration):  # a Future refuses these (they would end a coroutine)
                future.set_exception(RuntimeError(f"{type(value).__name__} raised in a {self.name} thread"))
            else:
                future.set_exception(value)
