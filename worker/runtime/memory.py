"""Memory in use by this process: what a cleanup must give back (invariant 4)."""

from __future__ import annotations

import os


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
