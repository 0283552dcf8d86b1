"""Memory in use by this process: what a cleanup must give back (invariant 4)."""

from __future__ import annotations

import gc
import os
import threading

_freezing = threading.Lock()
#: Set once the freeze is done. Not derived from `gc.get_freeze_count()`: that walks the whole
#: frozen generation (about 200,000 objects, 18 ms idle, 50 ms beside serving) with the GIL held,
#: and every load asks.
_frozen = False


def memory_in_use(device: str) -> int:
    """Bytes: CUDA memory allocated on a GPU device, resident set size otherwise."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated(device))
    return rss_bytes()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def freeze_before_first_version() -> None:
    """Take what the process holds before its first model version out of the cyclic collector's
    sight (`gc.freeze`): the libraries, about 240,000 objects once torch and ultralytics are in.

    A full collection walks every tracked object with the GIL held: 180 ms in a worker on this
    project's machine, and each cleanup runs them (so that a freed version's memory comes back
    at once), which stalled the event loop and the inference thread beside every update. Frozen,
    a full collection walks only what came later: 6–7 ms. Once, and before any version is loaded:
    a version frozen with the rest would keep its reference cycles after its cleanup.

    No collection first: with torch and ultralytics imported, a full one found 33 objects of
    garbage among 239,000 and took 40–54 ms of a worker's start, the GIL held; those few stay."""
    global _frozen
    with _freezing:
        if not _frozen:
            gc.freeze()
            _frozen = True
