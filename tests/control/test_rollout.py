"""`hotswap rollout` against real workers on the real broker, under load: A/A rollouts promote,
a drifting version is stopped in its shadow phase, a failing or slower one at a canary step, and
an operator killed mid-rollout leaves the fleet at its step for `--resume` to finish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from control.operator import Operator
from control.rollout import Outcome, Rollout
from schemas.control import Heartbeat
from schemas.rollout import RolloutPlan
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, InProcessWorker, Metric, ServeInProcess, StartLoad

    from schemas.signing import KeyFiles

pytestmark = pytest.mark.slow


def plan(stable: str, candidate: str, **changes: Any) -> RolloutPlan:
    settings: dict[str, Any] = {
        "stable": stable, "candidate": candidate, "shadow_percent": 50.0, "steps": [25.0, 100.0],
        "interval_s": 1.0, "step_timeout_s": 45.0, "min_samples": 40, "min_agreement": 0.9,
        "max_error_rate": 0.01, "max_latency_ratio": 1.5, "confidence": 0.99, **changes,
    }
    return RolloutPlan.model_validate(settings)


async def roll(operator: Operator, model: str, rollout_plan: RolloutPlan) -> Outcome:
    lines: list[str] = []
    outcome = await Rollout(operator, model, rollout_plan, say=lines.append).run()
    print("\n".join(lines))
    return outcome


def serving(worker: InProcessWorker, model: str) -> tuple[str, dict[str, float] | None, bool, set[str]]:
    deployment = worker.models.table.get(model)
    assert deployment is not None
    return (deployment.active.version, dict(deployment.weights) if deployment.weights else None,
            deployment.shadow is not None, set(deployment.loaded))


async def test_aa_rollouts_promote_under_load_and_never_abort(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad, heldout: list[HeldOut]
) -> None:
    workers = [await serve_in_process("trivial@1.0.0", name=f"aa{i}") for i in range(2)]
    running = load(concurrency=8, model="trivial")
    await running.wait_for(20)
    outcomes = [await roll(operator, "trivial", plan(a, b)) for a, b in
                (("1.0.0", "2.0.0"), ("2.0.0", "1.0.0"), ("1.0.0", "2.0.0"))]
    results = await running.stop()  # nothing lost, nothing failed
    assert [o.promoted for o in outcomes] == [True] * 3, [(o.gate, o.reason) for o in outcomes]
    assert all(r.status == "ok" and r.version in ("1.0.0", "2.0.0") for r in results)
    for worker in workers:
        assert serving(worker, "trivial") == ("2.0.0", None, False, {"1.0.0", "2.0.0"})  # 1.0.0 on standby


async def test_aa_rollout_of_a_real_model_promotes(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad
) -> None:
    worker = await serve_in_process("shapes@2.0.0", name="real")
    running = load(concurrency=6)
    await running.wait_for(10)
    outcome = await roll(operator, "shapes", plan("2.0.0", "2.0.1", shadow_percent=100.0, steps=[50.0, 100.0]))
    results = await running.stop()  # nothing lost, nothing failed
    assert outcome.promoted, (outcome.gate, outcome.reason)
    agreement = [v for phase, v in outcome.verdicts if phase.startswith("shadow")]
    assert agreement and "mean agreement 1.000" in agreement[0].reason
    assert {r.version for r in results} == {"2.0.0", "2.0.1"}
    assert serving(worker, "shapes")[0] == "2.0.1"


async def test_a_drifting_version_is_aborted_in_shadow_before_it_serves_a_job(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad, metric: Metric
) -> None:
    worker = await serve_in_process("shapes@2.0.0", name="drift")
    running = load(concurrency=6)
    await running.wait_for(10)
    async with operator.events() as events:
        outcome = await roll(operator, "shapes", plan("2.0.0", "2.1.0-drift", shadow_percent=100.0))
        progress = [e for e in _drain(events) if not isinstance(e, Heartbeat)]
    results = await running.stop()
    assert not outcome.promoted and outcome.gate == "agreement", outcome.reason
    assert outcome.reason.startswith("shadow 100% on 2.1.0-drift") and "below the floor 0.9" in outcome.reason
    assert {r.version for r in results} == {"2.0.0"}  # not one primary job on the candidate
    assert serving(worker, "shapes") == ("2.0.0", None, False, {"2.0.0"})  # candidate unloaded
    assert any(p.phase == "done" and p.reason and "aborted (agreement)" in p.reason for p in progress)
    exposition = await worker.text("/metrics")
    assert metric(exposition, "hotswap_rollout_aborts_total", model="shapes", candidate="2.1.0-drift",
                  gate="agreement") == 1


@pytest.mark.parametrize(("change", "gate"), [({"fail_above_pixels": 4096}, "errors"), ({"delay_ms": 40}, "latency")])
async def test_a_failing_or_slower_version_is_aborted_at_a_canary_step_and_rolled_back_within_a_second(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad, model_root: Path,
    change: dict[str, Any], gate: str,
) -> None:
    write_trivial_model(model_root, "3.0.0", whole_image=True, **change)  # passes validation (32×32 images)
    workers = [await serve_in_process("trivial@1.0.0", name=f"canary{i}") for i in range(2)]
    running = load(concurrency=8, model="trivial")
    await running.wait_for(20)
    outcome = await roll(operator, "trivial", plan("1.0.0", "3.0.0", shadow_percent=0.0, steps=[50.0, 100.0],
                                                   min_samples=30))
    results = await running.stop()  # nothing lost, nothing failed
    assert not outcome.promoted and outcome.gate == gate, outcome.reason
    assert outcome.reason.startswith("canary 50% to 3.0.0")
    assert outcome.rollback_s is not None and outcome.rollback_s < 1.0, outcome.rollback_s
    # The candidate's failures are the rollout's evidence; each of those jobs ran again on stable.
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
    assert {r.version for r in results} == ({"1.0.0"} if gate == "errors" else {"1.0.0", "3.0.0"})
    for worker in workers:
        assert serving(worker, "trivial") == ("1.0.0", None, False, {"1.0.0"})


async def test_an_operator_killed_mid_rollout_leaves_the_fleet_at_its_step_and_resume_finishes(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad, amqp_url: str, namespace: str,
    control_keys: KeyFiles,
) -> None:
    workers = [await serve_in_process("trivial@1.0.0", name=f"resume{i}") for i in range(2)]
    running = load(concurrency=6, model="trivial")
    env = {**os.environ, "HOTSWAP_AMQP_URL": amqp_url, "HOTSWAP_NAMESPACE": namespace, "COLUMNS": "200",
           "HOTSWAP_CONTROL_KEY": str(control_keys.control_key),
           "HOTSWAP_WORKER_PUBLIC_KEY": str(control_keys.worker_public)}
    common = ["--settle", "1", "--min-samples", "30", "--shadow", "0"]
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control", "rollout", "trivial", "2.0.0", "--steps", "25,50,100",
        "--interval", "5s", *common, env=env)  # killed well within its first step's 5 s
    await _until(lambda: all(serving(w, "trivial")[1] == {"1.0.0": 75.0, "2.0.0": 25.0} for w in workers))
    cli.send_signal(signal.SIGKILL)
    await cli.wait()
    await asyncio.sleep(2.0)  # nobody drives the rollout now: the fleet stays where it was
    assert all(serving(w, "trivial")[1] == {"1.0.0": 75.0, "2.0.0": 25.0} for w in workers)
    shown = await _cli(env, "status", "--json", "--listen", "1.5")
    marks = [beat["models"]["trivial"]["rollout"] for beat in json.loads(shown).values()]
    assert len(marks) == 2 and all(m["phase"] == "canary" and m["step"] == 0 for m in marks), marks

    resumed = await _cli(env, "rollout", "trivial", "--resume", "--settle", "1")  # the plan comes from the log
    assert "promoted trivial 2.0.0" in resumed, resumed
    results = await running.stop()
    assert {r.version for r in results} == {"1.0.0", "2.0.0"}
    assert all(serving(w, "trivial")[:2] == ("2.0.0", None) for w in workers)
    again = await _cli(env, "rollout", "trivial", "--resume", check=False)
    assert "is over: promoted" in again


async def test_abort_from_the_cli_puts_traffic_back_on_stable(
    serve_in_process: ServeInProcess, operator: Operator, amqp_url: str, namespace: str, control_keys: KeyFiles,
) -> None:
    worker = await serve_in_process("trivial@1.0.0", name="abort")
    slow = plan("1.0.0", "2.0.0", shadow_percent=0.0, steps=[10.0, 100.0], interval_s=600.0, step_timeout_s=900.0)
    task = asyncio.create_task(Rollout(operator, "trivial", slow).run())
    await _until(lambda: serving(worker, "trivial")[1] == {"1.0.0": 90.0, "2.0.0": 10.0})
    task.cancel()  # as good as a dead operator: the step stays in the log
    env = {**os.environ, "HOTSWAP_AMQP_URL": amqp_url, "HOTSWAP_NAMESPACE": namespace,
           "HOTSWAP_CONTROL_KEY": str(control_keys.control_key),
           "HOTSWAP_WORKER_PUBLIC_KEY": str(control_keys.worker_public), "COLUMNS": "200"}
    aborted = await _cli(env, "rollout", "trivial", "--abort", "--settle", "1", check=False)
    assert "aborting (operator)" in aborted and "traffic back on 1.0.0" in aborted, aborted
    assert serving(worker, "trivial") == ("1.0.0", None, False, {"1.0.0"})


def _drain(events: asyncio.Queue[Any]) -> list[Any]:
    drained = []
    while not events.empty():
        drained.append(events.get_nowait())
    return drained


async def _until(condition: Any, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


async def _cli(env: dict[str, str], *args: str, check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    text = output.decode()
    assert not check or process.returncode == 0, text
    return text
