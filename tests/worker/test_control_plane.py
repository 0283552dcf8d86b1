"""Update, rollback, A/B and refusals across two workers under continuous load: in processes of
their own where the test needs one (an update under load, a restart, memory, pickles), else in
the test's event loop."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from control.client import Client
from control.operator import Operator, WaitReport
from schemas.control import Heartbeat, Progress, Rollback, Shadow, Traffic, Update
from schemas.jobs import InferenceParams, JobResult
from schemas.signing import Signer, generate_keys
from worker.outputs import score_results

if TYPE_CHECKING:
    from conftest import (
        BackgroundLoad,
        HeldOut,
        Metric,
        Reference,
        SameAsReference,
        ServeInProcess,
        StartLoad,
        StartWorker,
        WriteTrojan,
    )

pytestmark = pytest.mark.slow

#: Edits a crafted version: its directory and its manifest's JSON (as a dict).
EditManifest = Callable[[Path, dict[str, Any]], None]


def assert_ok(report: WaitReport, workers: set[str]) -> None:
    assert set(report.workers) == workers, report.workers
    assert report.ok, (report.missing, report.failures)


def assert_switched_once(running: BackgroundLoad, worker: str, order: list[str]) -> None:
    """The worker served the versions in `order`, switching once. Checked lane by lane: a lane's
    next job is published only once its last is answered, so it reaches the worker later, while
    results of different lanes may arrive in any order (batches of the old and new version can
    finish out of order)."""
    served: set[str] = set()
    for results in running.by_lane.values():
        versions = [v for v, _ in groupby(r.version or "" for r in results if r.worker_id == worker)]
        positions = [order.index(v) for v in versions]
        if positions:
            assert positions == list(range(positions[0], positions[0] + len(positions))), (worker, versions)
        served.update(versions)
    assert served == set(order), (worker, served)


async def test_update_under_load_switches_each_worker_once_to_the_new_versions_answers(
    start_worker: StartWorker, operator: Operator, load: StartLoad, heldout: list[HeldOut], zoo: Path,
    reference: Reference, same_as_reference: SameAsReference,
) -> None:
    start_worker("shapes@1.0.0", name="a"), start_worker("shapes@1.0.0", name="b")
    # At confidence 0.5 the versions answer plainly differently on the held-out images; at the
    # default 0.25 both find about 95 of its 100 objects.
    params = InferenceParams(conf=0.5)
    running = load(concurrency=8, params=params)
    await running.wait_for(100)
    report = await operator.publish_and_wait("shapes", Update(version="2.0.0"))
    assert_ok(report, {"a", "b"})
    for worker in ("a", "b"):
        assert [p.phase for p in report.progress[worker]] == ["received", "preload", "validate", "swap", "done"]
    done = len(running.results)
    await running.wait_for(done + 100)
    await running.stop()
    for worker in ("a", "b"):
        assert_switched_once(running, worker, ["1.0.0", "2.0.0"])
    # Each answer is the one its version gives in-process (ultralytics alone): the label and the
    # model behind it changed together. Which version finds more depends on the CPU the zoo was
    # trained on (training is deterministic on one machine only), so that is printed, not assumed.
    yolos = {version: reference(zoo / "shapes" / version) for version in ("1.0.0", "2.0.0")}
    theirs: dict[tuple[Path, str], Any] = {}
    for path, result in running.results:
        key = (path, result.version or "")
        if key not in theirs:
            theirs[key] = yolos[key[1]].predict(str(path), imgsz=128, conf=params.conf, verbose=False)[0].boxes
        same_as_reference(result, theirs[key], key)
    both = {p for p, v in theirs if v == "1.0.0"} & {p for p, v in theirs if v == "2.0.0"}
    assert len(both) >= len(heldout) // 2, f"only {len(both)} images were served by both versions"
    assert any(len(theirs[p, "1.0.0"]) != len(theirs[p, "2.0.0"]) for p in both), "the versions answer alike"
    truth = {h.path: h.expected for h in heldout}
    rates = {version: score_results("detect", ((truth[p], r) for p, r in running.results
                                               if p in both and r.version == version)).recall
             for version in ("1.0.0", "2.0.0")}
    print(f"held-out recall by version under load, on the {len(both)} images both served: {rates}")


async def test_warm_rollback_is_a_swap_without_loading(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad
) -> None:
    await serve_in_process("shapes@1.0.0", name="a"), await serve_in_process("shapes@1.0.0", name="b")
    assert_ok(await operator.publish_and_wait("shapes", Update(version="2.0.0")), {"a", "b"})
    running = load(concurrency=8)
    await running.wait_for(50)
    report = await operator.publish_and_wait("shapes", Rollback())
    assert_ok(report, {"a", "b"})
    for worker in ("a", "b"):
        assert [p.phase for p in report.progress[worker]] == ["received", "swap", "done"]
    last = max(p.at for events in report.progress.values() for p in events if p.phase == "done")
    elapsed_ms = (last - report.command.issued_at).total_seconds() * 1000
    print(f"warm rollback: publish → last worker done in {elapsed_ms:.0f} ms")
    done = len(running.results)
    await running.wait_for(done + 60)
    await running.stop()
    for worker in ("a", "b"):
        assert_switched_once(running, worker, ["2.0.0", "1.0.0"])


async def test_traffic_split_is_weighted_sticky_and_shadowed(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], metric: Metric
) -> None:
    a, _ = await serve_in_process("shapes@1.0.0", name="a"), await serve_in_process("shapes@1.0.0", name="b")
    assert_ok(await operator.publish_and_wait("shapes", Update(version="2.0.0", activate="standby")), {"a", "b"})
    split = Traffic(weights={"1.0.0": 90, "2.0.0": 10}, shadow=Shadow(version="2.0.0", percent=20))
    assert_ok(await operator.publish_and_wait("shapes", split), {"a", "b"})

    semaphore = asyncio.Semaphore(32)

    async def one(i: int, key: str | None = None) -> JobResult:
        async with semaphore:
            return await client.submit(heldout[i % len(heldout)].path, model="shapes", routing_key=key)

    results = await asyncio.gather(*(one(i) for i in range(2000)))
    shares = Counter(r.version for r in results)
    print(f"traffic 90/10 over 2,000 jobs: {dict(shares)}")
    assert all(r.status == "ok" for r in results)
    assert abs(shares["2.0.0"] / 2000 - 0.10) <= 0.03
    for key in ("user-1", "user-2", "user-3", "user-4"):
        sticky = await asyncio.gather(*(one(i, key) for i in range(20)))
        assert len({r.version for r in sticky}) == 1, key
    pinned = await client.submit(heldout[0].path, model="shapes", version="canary")
    assert pinned.version == "2.0.0"
    await asyncio.sleep(0.5)  # shadow runs finish after their results
    metrics = await a.text("/metrics")
    samples = metric(metrics, "hotswap_shadow_agreement_ratio_count", primary="1.0.0", shadow="2.0.0")
    agreement = metric(metrics, "hotswap_shadow_agreement_ratio_sum", primary="1.0.0", shadow="2.0.0") / max(samples, 1)
    print(f"shadow agreement 1.0.0 vs 2.0.0 over {samples:.0f} runs: {agreement:.2f}")
    assert samples > 0 and 0.2 < agreement < 0.999, "versions of different quality agree partly, not fully"
    assert metric(metrics, "hotswap_traffic_weight_percent", version="2.0.0") == 10


def craft(model_root: Path, name: str, source: str, edit: EditManifest) -> None:
    """A new version directory copied from `source`, its manifest (and files) edited."""
    target = model_root / "shapes" / name
    shutil.copytree((model_root / "shapes" / source).resolve(), target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = name
    edit(target, manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))


async def test_bad_updates_are_refused_with_reasons_and_serving_goes_on(
    start_worker: StartWorker, operator: Operator, load: StartLoad, model_root: Path, amqp_url: str, namespace: str,
    metric: Metric, trojan: WriteTrojan
) -> None:
    import hashlib

    from safetensors.torch import save_file

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def wrong_sha(_: Path, m: dict[str, Any]) -> None:
        m["sha256"] = "0" * 64

    def corrupt(d: Path, m: dict[str, Any]) -> None:
        (d / m["artifact"]).write_bytes((d / m["artifact"]).read_bytes()[:5000])
        m["sha256"] = sha(d / m["artifact"])

    def not_yolo(d: Path, m: dict[str, Any]) -> None:
        import torch

        save_file({"weights": torch.zeros(3)}, d / m["artifact"])
        m["sha256"] = sha(d / m["artifact"])

    def slow(_: Path, m: dict[str, Any]) -> None:
        m["input_size"] = 640  # the same network at 25× the pixels
        m["calibration"] = None

    def missing(d: Path, m: dict[str, Any]) -> None:
        (d / m["artifact"]).unlink()

    def unknown_backend(_: Path, m: dict[str, Any]) -> None:
        m["backend"] = "onnx"

    # A trojaned checkpoint, signed like any update: as a pickle, and under manifests that lie.
    marker = model_root.parent / "trojan-payload-ran"

    def trojaned(fmt: str) -> EditManifest:
        def edit(d: Path, m: dict[str, Any]) -> None:
            (d / m["artifact"]).unlink()
            m.update(format=fmt, artifact="model.pt", sha256=sha(trojan(d / "model.pt", marker)))

        return edit

    crafted = {"3.0.0-wrongsha": wrong_sha, "3.0.0-corrupt": corrupt, "3.0.0-notyolo": not_yolo,
               "3.0.0-slow": slow, "3.0.0-missing": missing, "3.0.0-onnx": unknown_backend,
               "3.0.0-pickle": trojaned("pickle"), "3.0.0-lies-safetensors": trojaned("safetensors"),
               "3.0.0-lies-statedict": trojaned("state-dict")}
    for name, edit in crafted.items():
        craft(model_root, name, "2.0.0", edit)
    a, _ = start_worker("shapes@1.0.0", name="a"), start_worker("shapes@1.0.0", name="b")
    running = load(concurrency=8)
    await running.wait_for(40)

    expected = {"3.0.0-wrongsha": "sha256", "3.0.0-corrupt": "could not load", "3.0.0-notyolo": "could not load",
                "3.0.0-slow": "latency", "3.0.0-missing": "missing", "3.0.0-onnx": "unknown backend",
                "3.0.0-pickle": "this worker does not allow pickles (HOTSWAP_ALLOW_PICKLE)",
                "3.0.0-lies-safetensors": "not a valid safetensors file",
                "3.0.0-lies-statedict": "not a valid state-dict file: WeightsUnpickler error: Unsupported global",
                "0.9.0-bad": "calibration recall", "9.9.9": "not found"}
    for version, reason in expected.items():
        report = await operator.publish_and_wait("shapes", Update(version=version))
        assert set(report.workers) == {"a", "b"} and not report.missing
        for worker in ("a", "b"):
            final = report.final(worker)
            assert final is not None and final.phase == "failed" and reason in (final.reason or ""), final
    assert not marker.exists(), "a trojaned checkpoint's payload ran in a worker"

    # A forged command (another key) and a replayed one (an old envelope sent again).
    async with Operator(amqp_url, namespace=namespace, signer=Signer.from_file(
            generate_keys(model_root.parent / "intruder").control_key)) as intruder:
        async with operator.events() as events:
            forged = await intruder.publish("shapes", Update(version="2.0.0"), seq=1000)
            refusals = await _collect(events, forged.command_id, {"a", "b"})
        assert all("bad signature" in (p.reason or "") for p in refusals.values())
    good = await operator.publish_and_wait("shapes", Rollback(to="1.0.0"))
    envelope = operator.signer.sign(good.command)  # type: ignore[union-attr]
    async with operator.events() as events:
        await operator.publish_envelope(envelope.model_dump_json().encode(), good.command.command_id)
        refusals = await _collect(events, good.command.command_id, {"a", "b"}, phase="refused")
    assert all("duplicate" in (p.reason or "") for p in refusals.values())

    results = await running.stop()
    assert {r.version for r in results} == {"1.0.0"}
    beats = await operator.heartbeats(1.5)
    assert beats["a"].models["shapes"].active == "1.0.0"
    assert beats["a"].models["shapes"].versions["0.9.0-bad"].state == "failed"
    metrics = a.text("/metrics")
    assert metric(metrics, "hotswap_control_commands_total", action="update", outcome="failed") == len(expected)
    assert metric(metrics, "hotswap_control_commands_total", outcome="refused") == 2
    assert "0.9.0-bad" in a.get("/status")["control"]["unusable"]["shapes"]


async def _collect(
    events: asyncio.Queue[Progress | Heartbeat], command_id: str, workers: set[str], phase: str = "refused",
    timeout_s: float = 15
) -> dict[str, Progress]:
    found: dict[str, Progress] = {}
    async with asyncio.timeout(timeout_s):
        while set(found) != workers:
            event = await events.get()
            if isinstance(event, Progress) and event.command_id == command_id and event.phase == phase:
                found[event.worker_id] = event
    return found


async def test_a_late_or_restarted_worker_converges_without_loading_replaced_versions(
    start_worker: StartWorker, operator: Operator, client: Client, heldout: list[HeldOut]
) -> None:
    first = start_worker("shapes@1.0.0", name="first")
    for action in (Update(version="2.0.0"), Update(version="0.9.0-bad"), Rollback(),
                   Update(version="2.0.0", activate="canary", canary_percent=30),
                   Traffic(weights={"1.0.0": 50, "2.0.0": 50})):
        await operator.publish_and_wait("shapes", action, settle_s=0.6)
    late = start_worker("shapes@1.0.0", name="late")
    beats = await operator.heartbeats(1.5)

    def view(worker: str) -> tuple[str | None, int, dict[str, tuple[str, float]]]:
        state = beats[worker].models["shapes"]
        return state.active, state.last_seq, {v: (s.state, s.weight) for v, s in state.versions.items()}

    assert view("late") == view("first")
    assert view("late")[0] == "1.0.0" and view("late")[2]["2.0.0"] == ("standby", 50)
    loaded = re.findall(r"shapes/(\S+) ready", late.log_path.read_text())
    assert sorted(loaded) == ["1.0.0", "2.0.0"], loaded  # never 0.9.0-bad, nothing twice

    first.stop()
    restarted = start_worker("shapes@1.0.0", name="first")  # the same deployment, restarted
    beats = await operator.heartbeats(1.5)
    assert view("first") == view("late")
    assert "0.9.0-bad ready" not in restarted.log_path.read_text()
    result = await client.submit(heldout[0].path, model="shapes")
    assert result.status == "ok" and result.version in {"1.0.0", "2.0.0"}


async def test_update_cleanup_cycles_return_memory(start_worker: StartWorker, operator: Operator) -> None:
    worker = start_worker("shapes@1.0.0", env={"HOTSWAP_KEEP_STANDBY": "0"})

    def rss() -> int:
        assert worker.process is not None
        status = Path(f"/proc/{worker.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]

    after: list[int] = []
    for cycle in range(20):
        version = "2.0.0" if cycle % 2 == 0 else "1.0.0"
        assert_ok(await operator.publish_and_wait("shapes", Update(version=version), settle_s=0.2), {"w1"})
        after.append(rss())
    growth = after[-1] / after[0]
    print(f"RSS after cycle 1: {after[0] / 2**20:.1f} MiB, after cycle 20: {after[-1] / 2**20:.1f} MiB "
          f"({growth:.3f}×)")
    assert growth <= 1.10
    cleanups = worker.get("/status")["control"]["cleanups"]
    assert cleanups and all(c["memory_before"] > 0 for c in cleanups)


async def test_artifacts_by_uri_from_allowed_sources_only(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut], model_root: Path,
    tmp_path: Path
) -> None:
    from aiohttp import web

    published = tmp_path / "published"
    for name in ("4.0.0", "4.1.0"):
        craft(model_root, name, "2.0.0", lambda _d, _m: None)
        shutil.move(model_root / "shapes" / name, published / "shapes" / name)  # only reachable by URI
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(published, elsewhere)
    sha = json.loads((published / "shapes" / "4.0.0" / "manifest.json").read_text())["sha256"]

    app = web.Application()
    app.router.add_static("/models/", published)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    http = f"http://127.0.0.1:{runner.addresses[0][1]}/models"
    await serve_in_process("shapes@1.0.0", name="a", artifact_sources=[f"file://{published}/", f"{http}/"],
                           artifact_cache=tmp_path / "cache")

    async def update(version: str, uri: str, pinned: str = sha) -> WaitReport:
        from schemas.control import ArtifactRef

        return await operator.publish_and_wait(
            "shapes", Update(version=version, artifact=ArtifactRef(uri=uri, sha256=pinned)), settle_s=0.6
        )

    try:
        refused = {
            f"file://{elsewhere}/shapes/4.0.0/model.safetensors": "not under an allowed artifact source",
            f"file://{published}/../elsewhere/shapes/4.0.0/model.safetensors": "not under an allowed artifact source",
            f"file://{published}/%2e%2e/elsewhere/shapes/4.0.0/model.safetensors": "not under an allowed",
            f"{http}/%2e%2e/elsewhere/shapes/4.0.0/model.safetensors": "'..'",
            f"file://{published}/shapes/4.2.0/model.safetensors": "cannot fetch",
            f"{http}/shapes/4.2.0/model.safetensors": "cannot fetch",
        }
        for uri, reason in refused.items():
            report = await update("4.0.0" if "4.0.0" in uri else "4.2.0", uri)
            final = report.final("a")
            assert final is not None and final.phase == "failed" and reason in (final.reason or ""), final
        wrong = await update("4.1.0", f"{http}/shapes/4.1.0/model.safetensors", pinned="1" * 64)
        assert "sha256" in (wrong.final("a").reason or "")  # type: ignore[union-attr]

        assert_ok(await update("4.0.0", f"file://{published}/shapes/4.0.0/model.safetensors"), {"a"})
        assert (await client.submit(heldout[0].path, model="shapes")).version == "4.0.0"
    finally:
        await runner.cleanup()


async def test_a_pickled_checkpoint_loads_only_on_a_worker_that_allows_pickles(
    start_worker: StartWorker, operator: Operator, client: Client, heldout: list[HeldOut], model_root: Path, zoo: Path,
    reference: Reference
) -> None:
    def pickled(d: Path, m: dict[str, Any]) -> None:
        import hashlib

        (d / m["artifact"]).unlink()
        reference(zoo / "shapes" / "2.0.0").save(d / "model.pt")  # a genuine ultralytics checkpoint
        sha = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
        m.update(format="pickle", artifact="model.pt", architecture=None, sha256=sha)

    craft(model_root, "3.0.0-pickled", "2.0.0", pickled)
    start_worker("shapes@1.0.0", name="safe")
    start_worker("shapes@1.0.0", name="opted-in", env={"HOTSWAP_ALLOW_PICKLE": "1"})
    report = await operator.publish_and_wait("shapes", Update(version="3.0.0-pickled"))
    refused, loaded = report.final("safe"), report.final("opted-in")
    assert refused is not None and refused.phase == "failed", refused
    assert "does not allow pickles (HOTSWAP_ALLOW_PICKLE)" in (refused.reason or "")
    assert loaded is not None and loaded.phase == "done", loaded
    beats = await operator.heartbeats(1.5)
    assert beats["opted-in"].models["shapes"].active == "3.0.0-pickled"
    assert beats["safe"].models["shapes"].active == "1.0.0"
    assert beats["safe"].models["shapes"].versions["3.0.0-pickled"].state == "failed"
    served = await asyncio.gather(*(client.submit(heldout[i % len(heldout)].path, model="shapes") for i in range(40)))
    assert all(r.status == "ok" for r in served)
    assert {(r.worker_id, r.version) for r in served} <= {("safe", "1.0.0"), ("opted-in", "3.0.0-pickled")}
    assert any(r.worker_id == "opted-in" for r in served)


async def test_concurrency_rules(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, heldout: list[HeldOut]
) -> None:
    await serve_in_process("shapes@1.0.0", name="a"), await serve_in_process("shapes@1.0.0", name="b")
    # An update arriving while another is applied waits, and only the newest is loaded.
    async with operator.events() as events:
        first = await operator.publish("shapes", Update(version="2.0.0"))
        second = await operator.publish("shapes", Update(version="0.9.0-bad", activate="standby"))
        third = await operator.publish("shapes", Rollback())
        outcomes: dict[tuple[str, int], str] = {}
        async with asyncio.timeout(60):
            while len(outcomes) < 6:
                event = await events.get()
                if isinstance(event, Progress) and event.phase in {"done", "failed", "refused"}:
                    outcomes[(event.worker_id, event.seq)] = event.phase
    assert (first.seq, second.seq, third.seq) == (1, 2, 3)
    beats = await operator.heartbeats(1.2)
    for worker in ("a", "b"):
        assert beats[worker].models["shapes"].active == "1.0.0"
        assert beats[worker].models["shapes"].last_seq == 3

    # Two operators racing for the same sequence number: the first in the log wins.
    async with operator.events() as events:
        winner = await operator.publish("shapes", Update(version="2.0.0"), seq=4)
        loser = await operator.publish("shapes", Rollback(to="1.0.0"), seq=4)
        refused = await _collect(events, loser.command_id, {"a", "b"})
    assert all("stale" in (p.reason or "") for p in refused.values())
    assert (await client.submit(heldout[0].path, model="shapes")).version == "2.0.0"
    assert winner.seq == 4


@pytest.fixture
def intruder_url(amqp_url: str) -> Iterator[str]:
    """A broker user of its own with every right on the vhost: anyone able to publish anywhere."""
    import subprocess
    import uuid
    from urllib.parse import urlparse

    user, password = f"intruder-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    subprocess.run(["rabbitmqctl", "-q", "add_user", user, password], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", "/", user, ".*", ".*", ".*"], check=True,
                   capture_output=True)
    parsed = urlparse(amqp_url)
    try:
        yield f"amqp://{user}:{password}@{parsed.hostname}:{parsed.port or 5672}/"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], check=False, capture_output=True)


async def test_forged_status_events_do_not_change_what_wait_reports(
    serve_in_process: ServeInProcess, operator: Operator, intruder_url: str, namespace: str, tmp_path: Path
) -> None:
    """Another broker user copies each progress event as `done` (unsigned, and signed with a key of
    its own) and invents a worker; `--wait` still reports the real worker's failure, and only it."""
    import aio_pika

    from schemas.control import Heartbeat, Progress, SignedEnvelope

    await serve_in_process("shapes@2.0.0", name="a")
    intruder_key = Signer.from_file(generate_keys(tmp_path / "intruder").worker_key)
    connection = await aio_pika.connect(intruder_url)
    async with connection:
        channel = await connection.channel()
        status = await channel.get_exchange(f"{namespace}.status")
        spy = await channel.declare_queue(exclusive=True)
        await spy.bind(status, routing_key="progress.#")

        async def forge(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen = Progress.model_validate_json(SignedEnvelope.model_validate_json(message.body).body)
            if seen.worker_id != "a" or seen.phase != "received":
                return
            done = seen.model_copy(update={"phase": "done", "reason": None})
            ghost = Heartbeat(worker_id="ghost", at=done.at, models={})
            for body in (done.model_dump_json().encode(), intruder_key.sign_event(done),
                         ghost.model_dump_json().encode(), intruder_key.sign_event(ghost),
                         intruder_key.sign_event(done.model_copy(update={"worker_id": "ghost"}))):
                await status.publish(aio_pika.Message(body), routing_key=f"progress.shapes.{done.worker_id}")

        await spy.consume(forge, no_ack=True)
        report = await operator.publish_and_wait("shapes", Update(version="0.9.0-bad"), timeout_s=90)
    assert report.workers == ["a"], report.workers
    final = report.final("a")
    assert final is not None and final.phase == "failed" and "calibration recall" in (final.reason or "")
    assert not report.ok
    assert report.rejected_events["unsigned"] == 2 and report.rejected_events["bad signature"] == 3, \
        report.rejected_events
