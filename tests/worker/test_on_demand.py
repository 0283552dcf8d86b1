"""Versions on demand: a job pinned to a version the model allows this way loads it on first use,
against the real broker and real models, with the worker in the test's event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from typer.testing import Result

from control.client import Client
from control.operator import Operator
from schemas.control import Command, OnDemand, Update
from schemas.errors import ErrorCode
from schemas.jobs import JobResult
from schemas.signing import KeyFiles, Signer
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, InProcessWorker, Metric, ServeInProcess

pytestmark = pytest.mark.slow

LOADS, EVICTIONS = "hotswap_on_demand_loads_total", "hotswap_on_demand_evictions_total"


async def allow(operator: Operator, model: str, versions: list[str], workers: set[str], **bounds: Any) -> None:
    report = await operator.publish_and_wait(model, OnDemand(versions=versions, **bounds), settle_s=0.6)
    assert set(report.workers) == workers and report.ok, (report.missing, report.failures)


async def pinned(client: Client, image: Path, version: str, model: str = "trivial") -> JobResult:
    return await client.submit(image, model=model, version=version, timeout_s=60)


async def warm_versions(worker: InProcessWorker, model: str = "trivial") -> dict[str, str]:
    versions = (await worker.get("/status"))["models"][model]["versions"]
    return {name: v["state"] for name, v in versions.items() if v["on_demand"]}


async def test_a_pinned_job_loads_its_version_which_then_serves_pinned_jobs_only(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    worker = await serve_in_process("trivial@1.0.0", name="a")
    image = heldout[0].path
    await allow(operator, "trivial", ["2.0.0"], {"a"}, max_warm=2, idle_unload_s=300)
    assert await warm_versions(worker) == {}  # nothing loads before a job asks

    result = await pinned(client, image, "2.0.0")
    assert (result.status, result.version) == ("ok", "2.0.0"), result.error
    assert await warm_versions(worker) == {"2.0.0": "ready"}
    unpinned = await asyncio.gather(*(client.submit(image, model="trivial") for _ in range(20)))
    assert {(r.status, r.version) for r in unpinned} == {("ok", "1.0.0")}

    beat = (await operator.heartbeats(1.2))["a"].models["trivial"]
    assert beat.active == "1.0.0" and beat.versions["2.0.0"].on_demand and beat.versions["2.0.0"].weight == 0
    assert beat.versions["2.0.0"].last_used is not None and not beat.versions["1.0.0"].on_demand
    metrics = await worker.text("/metrics")
    assert metric(metrics, LOADS, model="trivial", outcome="loaded") == 1
    assert metric(metrics, "hotswap_model_version_info", version="2.0.0", state="ready") == 1

    late = await serve_in_process("trivial@1.0.0", name="late")  # replays the log: the same policy, nothing loaded
    assert worker.control is not None and late.control is not None
    assert late.control.desired("trivial") == worker.control.desired("trivial")
    assert await warm_versions(late) == {}


async def test_concurrent_pinned_jobs_share_one_load(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    worker = await serve_in_process("trivial@1.0.0", name="a")
    await allow(operator, "trivial", ["2.0.0"], {"a"})
    # Holding the model's lock keeps the load from starting until every job is waiting for it.
    async with worker.models.lock("trivial"):
        jobs = [asyncio.create_task(pinned(client, heldout[i % len(heldout)].path, "2.0.0")) for i in range(8)]
        async with asyncio.timeout(20):
            while (entry := worker.models.on_demand.warm("trivial").get("2.0.0")) is None or entry.waiting < 8:
                await asyncio.sleep(0.02)
    results = await asyncio.gather(*jobs)
    assert {(r.status, r.version) for r in results} == {("ok", "2.0.0")}
    assert metric(await worker.text("/metrics"), LOADS, model="trivial", outcome="loaded") == 1


async def test_max_warm_evicts_the_least_recently_used_idle_version(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric,
    model_root: Path
) -> None:
    for version in ("3.0.0", "4.0.0", "5.0.0"):
        write_trivial_model(model_root, version, whole_image=True)
    worker = await serve_in_process("trivial@1.0.0", name="a")
    image = heldout[0].path
    await allow(operator, "trivial", ["2.0.0", "3.0.0", "4.0.0", "5.0.0"], {"a"}, max_warm=2, idle_unload_s=300)
    for version in ("2.0.0", "3.0.0", "2.0.0"):  # 3.0.0 is now the least recently used
        assert (await pinned(client, image, version)).version == version
    assert (await pinned(client, image, "4.0.0")).version == "4.0.0"
    assert await warm_versions(worker) == {"2.0.0": "ready", "4.0.0": "ready"}

    # A version with a job in flight is never evicted, least recently used or not.
    busy = worker.models.on_demand.warm("trivial")["2.0.0"].version
    busy.in_flight += 1  # a job running on it, as far as eviction can tell
    try:
        assert (await pinned(client, image, "5.0.0")).version == "5.0.0"
    finally:
        busy.in_flight -= 1
    assert await warm_versions(worker) == {"2.0.0": "ready", "5.0.0": "ready"}

    metrics = await worker.text("/metrics")
    assert metric(metrics, EVICTIONS, model="trivial", reason="lru") == 2
    assert metric(metrics, LOADS, model="trivial", outcome="loaded") == 4
    cleanups = (await worker.get("/status"))["control"]["cleanups"]
    assert [c["version"] for c in cleanups] == ["3.0.0", "4.0.0"]  # freed as cleanup frees: memory measured
    assert all(c["memory_before"] > 0 for c in cleanups)


async def test_an_idle_version_is_unloaded_after_idle_unload_s(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    worker = await serve_in_process("trivial@1.0.0", name="a")
    image = heldout[0].path
    await allow(operator, "trivial", ["2.0.0"], {"a"}, idle_unload_s=1.0)
    assert (await pinned(client, image, "2.0.0")).version == "2.0.0"
    for _ in range(4):  # in use: it stays
        await asyncio.sleep(0.4)
        assert (await pinned(client, image, "2.0.0")).version == "2.0.0"
    assert await warm_versions(worker) == {"2.0.0": "ready"}
    async with asyncio.timeout(5):  # out of the snapshot at once, then freed as cleanup frees
        while (await worker.get("/status"))["control"]["cleanups"] == []:
            await asyncio.sleep(0.1)
    assert await warm_versions(worker) == {}
    assert [c["version"] for c in (await worker.get("/status"))["control"]["cleanups"]] == ["2.0.0"]
    assert metric(await worker.text("/metrics"), EVICTIONS, model="trivial", reason="idle") == 1
    assert (await pinned(client, image, "2.0.0")).version == "2.0.0"  # loads again on the next job
    assert metric(await worker.text("/metrics"), LOADS, model="trivial", outcome="loaded") == 2


async def test_a_version_failing_validation_answers_a_clear_error_and_serving_goes_on(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    worker = await serve_in_process("shapes@1.0.0", name="a")
    image = heldout[0].path
    await allow(operator, "shapes", ["2.0.0", "0.9.0-bad"], {"a"})
    for _ in range(2):  # the second is answered from what the first found: no second load
        bad = await pinned(client, image, "0.9.0-bad", model="shapes")
        assert bad.status == "error" and bad.error is not None
        assert bad.error.code == ErrorCode.VERSION_UNUSABLE and "calibration recall" in bad.error.message, bad.error
    served = await asyncio.gather(*(client.submit(image, model="shapes") for _ in range(10)))
    assert {(r.status, r.version) for r in served} == {("ok", "1.0.0")}
    assert (await pinned(client, image, "2.0.0", model="shapes")).version == "2.0.0"

    metrics = await worker.text("/metrics")
    assert metric(metrics, LOADS, model="shapes", outcome="failed") == 1
    assert metric(metrics, LOADS, model="shapes", outcome="loaded") == 1
    status = await worker.get("/status")
    assert "calibration recall" in status["control"]["unusable"]["shapes"]["0.9.0-bad"]
    assert "0.9.0-bad" not in status["models"]["shapes"]["versions"]
    beat = (await operator.heartbeats(1.2))["a"].models["shapes"]
    assert beat.versions["0.9.0-bad"].state == "failed"


async def test_versions_not_allowed_on_demand_are_unknown_as_before(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric,
    model_root: Path
) -> None:
    write_trivial_model(model_root, "3.0.0", whole_image=True)
    worker = await serve_in_process("trivial@1.0.0", name="a")
    image = heldout[0].path
    before = await pinned(client, image, "2.0.0")  # no policy at all
    assert before.error is not None and before.error.code == ErrorCode.UNKNOWN_VERSION
    await allow(operator, "trivial", ["2.0.0"], {"a"})
    outside = await pinned(client, image, "3.0.0")  # in the repository, not in the list
    assert outside.error is not None and outside.error.code == ErrorCode.UNKNOWN_VERSION, outside.error
    assert "not loaded on this worker" in outside.error.message
    assert (await pinned(client, image, "2.0.0")).version == "2.0.0"

    await allow(operator, "trivial", [], {"a"})  # off: what it loaded goes
    assert await warm_versions(worker) == {}
    after = await pinned(client, image, "2.0.0")
    assert after.error is not None and after.error.code == ErrorCode.UNKNOWN_VERSION
    metrics = await worker.text("/metrics")
    assert metric(metrics, EVICTIONS, model="trivial", reason="withdrawn") == 1
    assert metric(metrics, LOADS, model="trivial", outcome="loaded") == 1


async def test_versions_the_desired_state_keeps_are_never_evicted(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric,
    model_root: Path
) -> None:
    write_trivial_model(model_root, "3.0.0", whole_image=True)
    worker = await serve_in_process("trivial@1.0.0", name="a")
    image = heldout[0].path
    await allow(operator, "trivial", ["1.0.0", "2.0.0", "3.0.0"], {"a"}, max_warm=1, idle_unload_s=0.3)
    assert (await pinned(client, image, "2.0.0")).version == "2.0.0"
    # Standby now: the warm copy is adopted, not loaded again, and no longer the pool's to evict.
    report = await operator.publish_and_wait("trivial", Update(version="2.0.0", activate="standby"), settle_s=0.6)
    assert report.ok, report.failures
    assert (await pinned(client, image, "3.0.0")).version == "3.0.0"
    assert (await pinned(client, image, "1.0.0")).version == "1.0.0"  # the active version, pinned
    await asyncio.sleep(1.5)  # idle unload of 3.0.0, and of nothing the state keeps
    versions = (await worker.get("/status"))["models"]["trivial"]["versions"]
    assert {n: (v["state"], v["on_demand"]) for n, v in versions.items()} == {
        "1.0.0": ("active", False), "2.0.0": ("standby", False)}
    metrics = await worker.text("/metrics")
    assert metric(metrics, LOADS, model="trivial", outcome="loaded") == 2
    assert metric(metrics, EVICTIONS, model="trivial", reason="idle") == 1


def test_the_cli_signs_and_publishes_the_command(namespace: str, amqp_url: str, control_keys: KeyFiles) -> None:
    from typer.testing import CliRunner

    from control.cli import app

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, ["on-demand", "parsing", *args, "--key", str(control_keys.control_key),
                                        "--amqp-url", amqp_url, "--namespace", namespace])

    published = cli("--versions", "1.0.0,2.0.0", "--max-warm", "2", "--idle-unload", "5m")
    assert published.exit_code == 0, published.output
    assert cli("--off").exit_code == 0
    for bad in (["--versions", "1.0.0", "--idle-unload", "5x"], ["--versions", "1.0.0", "--max-warm", "0"], []):
        assert cli(*bad).exit_code == 2, bad

    async def read() -> list[Command]:
        async with Operator(amqp_url, namespace=namespace, signer=Signer.from_file(control_keys.control_key)) as op:
            return await op.read_log()

    commands = asyncio.run(read())
    assert [(c.seq, c.action) for c in commands] == [
        (1, OnDemand(versions=["1.0.0", "2.0.0"], max_warm=2, idle_unload_s=300)), (2, OnDemand(versions=[]))]


async def test_an_update_to_a_warm_version_still_checks_its_contract(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], model_root: Path
) -> None:
    write_trivial_model(model_root, "3.0.0", whole_image=True, classes={0: "other"})
    await serve_in_process("trivial@1.0.0", name="a")
    image = heldout[0].path
    await allow(operator, "trivial", ["3.0.0"], {"a"})
    warm = await pinned(client, image, "3.0.0")  # pinned: the producer asked for that shape of answer
    assert warm.version == "3.0.0" and warm.detections[0].class_name == "other"
    report = await operator.publish_and_wait("trivial", Update(version="3.0.0"), settle_s=0.6)
    final = report.final("a")
    assert final is not None and final.phase == "failed" and "contract changes" in (final.reason or ""), final
    assert (await client.submit(image, model="trivial")).version == "1.0.0"
