"""CPUs of its own for the inference thread (`HOTSWAP_INFERENCE_CPUS`), the rest for the others.

A model shares its core badly. Micro-batched on a 2-vCPU machine, a worker's inference thread
waited for a core 16 to 28 % of the time: the event loop, the decode threads, the broker and the
load generator, woken by every batch's results, preempted it about once a millisecond. So a worker
can keep its inference thread (and the torch threads it starts) on CPUs of its own, and every
other thread it starts (the loop, decoding, loading versions) off them. Benchmark 6, alternated,
two rounds each, with the load generator kept off the model's CPU too: shapes 0.800 -> 0.869 of
in-process, segment 0.764 -> 0.814, ULFD 0.910 -> 0.951, pose unchanged (0.774, 0.771); the
README's Performance section has the rest.

Off by default: workers sharing a host would otherwise all pick the same CPUs. Give each its own
(`taskset -c` syntax: `3`, `2,3`, `4-7`) where a host runs several. Linux only (`sched_setaffinity`
applies to the calling thread; threads inherit their creator's CPUs when they start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class CpuPlanError(ValueError):
    """The inference CPUs asked for cannot be had: malformed, or not CPUs this process may use."""


@dataclass(frozen=True)
class CpuPlan:
    """Where the inference thread runs, and where every other thread of the worker does."""

    inference: frozenset[int]
    others: frozenset[int]

    def describe(self) -> str:
        inference, others = format_cpu_list(self.inference), format_cpu_list(self.others)
        return f"inference thread on CPUs {inference}, other threads on {others}"


def parse_cpu_list(text: str) -> frozenset[int]:
    """`taskset -c` syntax: CPU numbers and ranges, comma separated (`0`, `2,3`, `4-7`)."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise CpuPlanError(f"{part!r} is not a CPU number or a range like 2-3") from None
        if low < 0 or high < low:
            raise CpuPlanError(f"{part!r} is not a CPU number or an ascending range")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def plan_cpus(inference: frozenset[int], allowed: frozenset[int] | None = None) -> CpuPlan | None:
    """The plan for `inference` among the CPUs this process may use (None: no pinning asked for).

    With every allowed CPU given to inference, the other threads share them: there is nothing else.
    """
    if not inference:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise CpuPlanError("this platform cannot keep a thread on given CPUs (sched_setaffinity is Linux's)")
    allowed = frozenset(os.sched_getaffinity(0)) if allowed is None else allowed
    if missing := inference - allowed:
        raise CpuPlanError(f"inference CPUs {format_cpu_list(frozenset(missing))} are not among the CPUs this "
                           f"worker may use ({format_cpu_list(allowed)})")
    return CpuPlan(inference, allowed - inference or allowed)


def pin_current_thread(cpus: frozenset[int]) -> None:
    """Run the calling thread on `cpus` only; threads it starts from now on inherit them."""
    os.sched_setaffinity(0, cpus)
