"""Load slots: at most `slots` versions are preloaded and validated at once on a host.

A command reaches every worker of a fleet at once, so the workers of one host all load the new
version in the same second: their loads compete for the cores (and a shared GPU's memory) with
each other and with serving. A slot makes them take turns, as Triton's
`--model-load-thread-count` does within one server, but across processes: it is an exclusive
`flock` on one of `slots` files in a directory the host's workers share (by default the system's
temporary directory). The kernel drops a lock when its holder exits, however it exits, so a
killed worker never keeps a slot. A load that has waited `wait_s` goes ahead without one and says
so in the log: no update is stuck behind a hung load.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: How often a waiting load tries the slots again (a non-blocking flock each: a few µs).
POLL_S = 0.02


class Slot:
    """A slot held (or, when `fd` is None, gone ahead without); `release()` once the load is done."""

    def __init__(self, fd: int | None, waited_s: float) -> None:
        self.fd = fd
        self.waited_s = waited_s

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with its file description
            self.fd = None


class LoadSlots:
    """`slots` files named `hotswap-load-<n>.lock` in `directory`; `slots` 0: loads never wait."""

    def __init__(self, directory: Path = Path(), slots: int = 0, wait_s: float = 0.0) -> None:
        self.directory = directory
        self.slots = slots
        self.wait_s = wait_s

    async def acquire(self, what: str) -> Slot:
        """A free slot, waiting for one up to `wait_s`; tried on the event loop, never blocking it."""
        if self.slots <= 0:
            return Slot(None, 0.0)
        try:
            files = self._open_each()
        except OSError as exc:  # no shared directory to take turns in: a load must not fail for that
            log.warning("%s: the load slots in %s cannot be used (%s); loading without one", what, self.directory, exc)
            return Slot(None, 0.0)
        started, held = time.monotonic(), None
        try:
            while (held := _lock_one(files)) is None:
                waited = time.monotonic() - started
                if waited >= self.wait_s:
                    log.warning("%s: every load slot of this host was still held after %.0f s "
                                "(HOTSWAP_LOAD_SLOTS=%d, in %s); loading without one",
                                what, waited, self.slots, self.directory)
                    return Slot(None, waited)
                await asyncio.sleep(POLL_S)
        finally:
            for fd in files:
                if fd != held:
                    os.close(fd)
        waited = time.monotonic() - started
        if waited >= 0.1:
            log.info("%s: waited %.2f s for a load slot (another worker of this host was loading)", what, waited)
        return Slot(held, waited)

    def _open_each(self) -> list[int]:
        """The slots' files, opened once per wait (the wait then tries their locks only)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        files: list[int] = []
        try:
            for n in range(self.slots):
                files.append(_open(self.directory / f"hotswap-load-{n}.lock"))
        except OSError:
            for fd in files:
                os.close(fd)
            raise
        return files


def _lock_one(files: list[int]) -> int | None:
    """The first of `files` whose exclusive lock this call took, None when every one is held."""
    for fd in files:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        return fd
    return None


def _open(path: Path) -> int:
    # Read-only: flock needs no more, so a file another user of the host created (0644) still
    # serves. Created only when missing: in a sticky directory such as /tmp the kernel refuses
    # O_CREAT on another user's file (fs.protected_regular).
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
