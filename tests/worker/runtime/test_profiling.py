"""The profile mode's steps: CPU and wall time each, so a thread's waits inside them show."""

from __future__ import annotations

import threading
import time

from worker.runtime.profiling import StepProfile


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_step_records_its_cpu_and_its_wall_time_apart() -> None:
    profile = StepProfile()
    profile.enabled = True

    def work() -> None:
        with profile.step("waits"):
            time.sleep(0.05)  # off the CPU, as a thread waiting for the GIL or a core is
        with profile.step("computes"):
            _spin(0.02)

    thread = threading.Thread(target=work, name="inference_0")
    thread.start()
    thread.join()
    steps = profile.snapshot()["steps"]
    waits, computes = steps["inference/waits"], steps["inference/computes"]
    assert waits["count"] == computes["count"] == 1
    assert waits["wall_s"] >= 0.05 and waits["cpu_s"] < 0.02
    assert computes["cpu_s"] >= 0.02 and computes["wall_s"] >= computes["cpu_s"]


def test_steps_cost_nothing_to_record_while_the_profile_is_off() -> None:
    profile = StepProfile()
    with profile.step("anything"):
        pass
    assert profile.snapshot()["steps"] == {}
