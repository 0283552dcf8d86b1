"""Memory in use by this process: what a cleanup must give back (invariant 4)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from functools import cache

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


#: glibc's `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks above it are
#: always mapped for themselves and unmapped when freed.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (`mallopt` and `malloc_trim` are glibc's, not POSIX's)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory(keep_bytes: int) -> bool:
    """Let up to `keep_bytes` of freed memory stay mapped in the C heap, for the next batch to
    reuse; False where that cannot be set (not glibc) or `keep_bytes` is 0.

    Why: with glibc's defaults a batch's activations (about 20 MB for a batch of 16 small images)
    are given back to the kernel when freed, because they sit at the top of the heap above the
    trim threshold (or are mapped for themselves above the mmap threshold), and the next batch
    faults every page in again, zeroed: 4,800 page faults per batch of 16, a fifth of its time
    in a process of its own, about 6 % in a worker (the README's Performance section).
    Kept mapped, the pages are reused. Blocks under 32 MiB come from the heap; free memory at a
    heap's top is trimmed only beyond `keep_bytes`. What a cleanup frees still goes back to the
    kernel: `return_freed_memory` (invariant 4).

    And one arena for every thread: an arena of its own (glibc's default for each new thread)
    grows in heaps of at most 64 MiB, and a heap left empty is unmapped whatever the trim
    threshold; M2FP cost more CPU in a thread than in the main thread (2479 against 2365 ms an
    image; with one arena 2268 in a thread). Call it before the process starts threads: an
    arena, once a thread has one, stays its own."""
    libc = _glibc()
    if libc is None or keep_bytes <= 0:
        return False
    # mallopt answers 1 on success. Setting either fixes glibc's sliding mmap threshold as well.
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(keep_bytes, _MMAP_THRESHOLD_MAX)))
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(keep_bytes, 2**31 - 1)))
    shared = libc.mallopt(_M_ARENA_MAX, ctypes.c_int(1))
    return bool(mapped and trimmed and shared)


def return_freed_memory() -> None:
    """Give every free page of the C heap back to the kernel (`malloc_trim(0)`), those that
    `keep_freed_memory` keeps mapped included: a cleanup's memory returns (invariant 4), and a
    load's temporaries do not stay mapped beside serving (7 MiB for shapes, more for larger
    models)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


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
