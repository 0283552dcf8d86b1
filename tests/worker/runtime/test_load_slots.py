"""Load slots (`worker.runtime.load_slots`): the workers of a host take turns loading versions; a
slot whose holder died is free, and a load never waits longer than its bound."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from worker.runtime.desired import DesiredState
from worker.runtime.load_slots import LoadSlots
from worker.runtime.manager import ModelManager
from worker.runtime.repository import ModelRepository
from worker.runtime.trivial_backend import TRIVIAL_MODEL, write_trivial_model

# Another worker of the host, as far as the slots can tell: a process of its own holding one.
_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


async def test_a_second_load_waits_until_the_first_gives_its_slot_back(tmp_path: Path) -> None:
    first, second = LoadSlots(tmp_path, 1, 60.0), LoadSlots(tmp_path, 1, 60.0)
    held = await first.acquire("shapes/1.0.0")
    waiting = asyncio.create_task(second.acquire("shapes/1.0.0"))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "two loads held the host's one slot at once"
    held.release()
    slot = await asyncio.wait_for(waiting, 5.0)
    assert slot.fd is not None and slot.waited_s > 0
    slot.release()


async def test_as_many_loads_run_at_once_as_there_are_slots(tmp_path: Path) -> None:
    slots = [LoadSlots(tmp_path, 2, 0.0) for _ in range(3)]
    held = [await s.acquire("shapes/2.0.0") for s in slots]
    assert [s.fd is not None for s in held] == [True, True, False]  # the third went ahead without
    for slot in held:
        slot.release()


async def test_a_slot_whose_holder_was_killed_is_free(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "hotswap-load-0.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert (await LoadSlots(tmp_path, 1, 0.0).acquire("shapes/1.0.0")).fd is None
    finally:
        holder.kill()
        holder.wait()
    slot = await LoadSlots(tmp_path, 1, 0.0).acquire("shapes/1.0.0")
    assert slot.fd is not None, "the killed holder's slot is still taken"
    slot.release()


async def test_a_load_waits_at_most_its_bound_then_goes_ahead_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = await LoadSlots(tmp_path, 1, 60.0).acquire("shapes/1.0.0")
    with caplog.at_level(logging.WARNING, logger="worker.runtime.load_slots"):
        slot = await LoadSlots(tmp_path, 1, 0.1).acquire("shapes/2.0.0")
    assert slot.fd is None and slot.waited_s >= 0.1
    assert "shapes/2.0.0: every load slot of this host was still held" in caplog.text
    held.release()


async def test_without_slots_loads_never_wait(tmp_path: Path) -> None:
    held = await LoadSlots(tmp_path, 1, 60.0).acquire("shapes/1.0.0")
    slot = await asyncio.wait_for(LoadSlots(tmp_path, 0, 60.0).acquire("shapes/2.0.0"), 1.0)
    assert slot.fd is None and slot.waited_s == 0
    held.release()


async def test_a_manager_loads_a_version_only_in_a_slot_and_gives_it_back(tmp_path: Path) -> None:
    write_trivial_model(tmp_path / "models")
    slots = tmp_path / "slots"
    manager = ModelManager(ModelRepository(tmp_path / "models"), "cpu", ThreadPoolExecutor(1),
                           slots=LoadSlots(slots, 1, 60.0))
    other_worker = await LoadSlots(slots, 1, 60.0).acquire(f"{TRIVIAL_MODEL}/1.0.0")
    loading = asyncio.create_task(manager.reconcile(DesiredState(TRIVIAL_MODEL, active="1.0.0")))
    await asyncio.sleep(0.3)
    assert not loading.done() and manager.table.get(TRIVIAL_MODEL) is None
    other_worker.release()
    await asyncio.wait_for(loading, 30.0)
    active = manager.table.get(TRIVIAL_MODEL)
    assert active is not None and active.active.version == "1.0.0"
    after = await asyncio.wait_for(LoadSlots(slots, 1, 60.0).acquire("next"), 1.0)
    assert after.fd is not None, "the manager kept its slot after the load"
    after.release()


async def test_a_slot_directory_that_cannot_be_used_loses_the_turns_not_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a file").write_text("")
    with caplog.at_level(logging.WARNING, logger="worker.runtime.load_slots"):
        slot = await LoadSlots(tmp_path / "a file" / "slots", 1, 60.0).acquire("shapes/2.0.0")
    assert slot.fd is None
    assert "shapes/2.0.0: the load slots in" in caplog.text and "cannot be used" in caplog.text
