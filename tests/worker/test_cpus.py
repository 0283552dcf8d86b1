"""The inference thread on CPUs of its own (`HOTSWAP_INFERENCE_CPUS`), the worker's other threads off them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydantic import ValidationError

from control.client import Client
from worker.config import WorkerSettings
from worker.cpus import CpuPlan, CpuPlanError, format_cpu_list, parse_cpu_list, plan_cpus

if TYPE_CHECKING:
    from conftest import HeldOut, StartWorker


@pytest.mark.parametrize(("text", "cpus"), [
    ("3", {3}), ("0,2", {0, 2}), ("4-7", {4, 5, 6, 7}), (" 1, 3-4 ,", {1, 3, 4}), ("", set()), ("2-2", {2}),
])
def test_cpu_lists_read_as_taskset_writes_them(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["x", "1-", "-1", "3-1", "1.5", "0-x"])
def test_a_malformed_cpu_list_says_which_part(text: str) -> None:
    with pytest.raises(CpuPlanError, match="is not a CPU number"):
        parse_cpu_list(text)


def test_the_other_threads_get_every_cpu_inference_does_not() -> None:
    allowed = frozenset({0, 1, 2, 3})
    assert plan_cpus(frozenset({3}), allowed) == CpuPlan(frozenset({3}), frozenset({0, 1, 2}))
    assert plan_cpus(frozenset(), allowed) is None
    # Every CPU to inference: the rest of the worker has nowhere else, so it shares them.
    assert plan_cpus(allowed, allowed) == CpuPlan(allowed, allowed)
    with pytest.raises(CpuPlanError, match="inference CPUs 4,9 are not among the CPUs this worker may use "
                                           r"\(0,1,2,3\)"):
        plan_cpus(frozenset({1, 4, 9}), allowed)
    assert format_cpu_list(frozenset({3, 1, 2})) == "1,2,3"


def test_the_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_INFERENCE_CPUS", "0-1,5")
    assert WorkerSettings().inference_cpus == {0, 1, 5}
    monkeypatch.setenv("HOTSWAP_INFERENCE_CPUS", "one")
    with pytest.raises(ValidationError, match="'one' is not a CPU number"):
        WorkerSettings()
    monkeypatch.delenv("HOTSWAP_INFERENCE_CPUS")
    assert WorkerSettings().inference_cpus == frozenset()


def _thread_cpus(pid: int) -> dict[int, frozenset[int]]:
    return {int(tid): frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for inference, one for the rest")
async def test_a_worker_keeps_its_inference_thread_on_its_cpus_and_the_rest_off_them(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut]
) -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    inference = frozenset({max(allowed)})
    worker = start_worker("shapes@1.0.0", env={"HOTSWAP_INFERENCE_CPUS": format_cpu_list(inference)})
    result = await client.submit(Path(heldout[0].path), model="shapes")  # the inference thread starts
    assert result.error is None
    assert worker.process is not None
    threads = _thread_cpus(worker.process.pid)
    assert threads[worker.process.pid] == allowed - inference  # the loop, and every thread it started
    pinned = [tid for tid, cpus in threads.items() if cpus == inference]
    assert len(pinned) == 1, threads  # the inference thread, and nothing else
    assert set(threads.values()) == {inference, allowed - inference}
    with open(f"/proc/{worker.process.pid}/task/{pinned[0]}/schedstat") as stat:
        assert int(stat.read().split()[0]) > 0  # it ran: the model's forward, on its CPU
