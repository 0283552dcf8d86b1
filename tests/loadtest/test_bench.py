"""The benchmarks' pure parts: goals and ratios, the summary, the latency spike, the trivial
backend, the bench's model repository and its command line. No timing is asserted here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from control.cli import app
from control.client import Client
from control.operator import WaitReport
from loadtest.bench import BenchSetupError, bench_document, check_zoo, parse_only
from loadtest.bench_core import (
    BenchResult,
    Goal,
    Metric,
    histogram_totals,
    latency_spike,
    print_result,
    print_summary,
    ratio,
    summary_rows,
    visible_after_ms,
    worker_means,
)
from loadtest.bench_env import BenchEnv, HelperProcess, broker_pid, collector_paused, harness_aside, quietest_cpu
from loadtest.bench_families import whole_passes
from loadtest.bench_inprocess import measure_backend
from loadtest.bench_throughput import TINY_SIDE, Series, machine_ceiling, write_tiny_pngs
from loadtest.bench_updates import jobs_row, submitted_while
from loadtest.records import JobRecord
from schemas.control import Command, Progress, Rollback
from schemas.jobs import InferenceParams
from schemas.manifest import Manifest
from worker.runtime.backend import BackendError, create_backend
from worker.runtime.repository import ModelRepository
from worker.runtime.trivial_backend import TrivialBackend, trivial_artifact, write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut


def test_goals_judge_values_and_leave_missing_ones_unjudged() -> None:
    assert Goal(">=", 0.9).met(0.9) is True and Goal(">=", 0.9).met(0.89) is False
    assert Goal("<=", 2).met(2.5) is False and Goal("==", 0).met(0) is True
    assert Goal(">=", 1.5).met(None) is None
    assert str(Goal("<=", 1.1)) == "<= 1.1"
    assert Metric("reported only", 3.0).passed is None
    assert Metric("lost jobs", 1, Goal("==", 0)).passed is False


def test_ratio_needs_both_figures_and_a_positive_denominator() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_summary_has_one_row_per_metric_and_shows_errors() -> None:
    ok = BenchResult(1, "pool", metrics=[Metric("a / b", 0.95, Goal(">=", 0.9)), Metric("c / d", 1.2, Goal(">=", 1.5)),
                                         Metric("ceiling", 1.8)])
    broken = BenchResult(2, "trivial", error="BenchError: a worker did not start")
    rows = summary_rows([ok, broken])
    assert [(r["measured"], r["passed"]) for r in rows] == [("a / b", True), ("c / d", False), ("ceiling", None),
                                                            ("error", None)]
    document = bench_document([ok, broken], {"run_id": "r1"})
    assert document["errors"] == 1 and document["missed"] == ["1. pool: c / d"]
    assert json.loads(json.dumps(document, default=str))["benchmarks"][0]["metrics"][0]["goal"] == ">= 0.9"
    console = Console(record=True, width=160)
    ok.rows = [{"measured": "x", "jobs/s": 12.345, "p99 ms": None}]
    print_result(ok, console)
    print_summary([ok, broken], console)
    text = console.export_text()
    assert "FAIL" in text and "pass" in text and "error: BenchError" in text and "12.3" in text


def _record(job: int, submitted: float, latency_ms: float) -> JobRecord:
    record = JobRecord(f"j{job}", "a.png", "shapes", submitted, 0.0)
    record.answered_at, record.latency_ms, record.status = submitted + latency_ms / 1000, latency_ms, "ok"
    return record


def test_latency_spike_compares_the_worst_bucket_of_the_change_with_the_steady_p99() -> None:
    t0 = 1000.0
    records = [_record(i, t0 + i * 0.1, 10.0) for i in range(50)]  # 0-5 s: 10 ms
    records += [_record(100 + i, t0 + 6 + i * 0.1, 80.0 if i < 10 else 20.0) for i in range(20)]  # 6-8 s
    records += [_record(200 + i, t0 + 12 + i * 0.1, 300.0) for i in range(10)]  # long after the change
    spike = latency_spike(records, t0, change_start=t0 + 6.0, change_end=t0 + 6.5, after_s=1.0)
    assert spike.steady_p99_ms == pytest.approx(10.0)
    assert spike.worst_bucket_p99_ms == pytest.approx(80.0)  # the 300 ms jobs are outside the window
    assert spike.ratio == pytest.approx(8.0)
    assert spike.steady_worst_bucket_p99_ms == pytest.approx(10.0)  # buckets 1-5 s; the 6th is the change's
    assert spike.bucket_ratio == pytest.approx(8.0)
    assert latency_spike([], t0, t0, t0).ratio is None


def test_the_spikes_reference_is_the_worst_whole_bucket_before_the_change() -> None:
    """One slow job in the steady part moves its worst bucket far more than its pooled p99; the
    first second (warming up) and the bucket the change starts in are not the steady part's."""
    t0 = 1000.0
    records = [_record(i, t0 + i * 0.1, 40.0 if i == 25 else 10.0) for i in range(60)]  # one slow job at 2.5 s
    records += [_record(90, t0 + 0.5, 300.0)]  # answered in the first second: left out
    records += [_record(100 + i, t0 + 6.5 + i * 0.1, 80.0) for i in range(10)]  # the change, from 6.5 s
    spike = latency_spike(records, t0, change_start=t0 + 6.5, change_end=t0 + 7.0, steady_from=t0 + 1.0)
    assert spike.steady_p99_ms is not None and spike.steady_p99_ms < 30.0
    assert spike.steady_worst_bucket_p99_ms is not None and 35.0 < spike.steady_worst_bucket_p99_ms < 50.0
    assert spike.bucket_ratio == pytest.approx(80.0 / spike.steady_worst_bucket_p99_ms)


def test_benchmark_3_splits_jobs_by_when_they_were_submitted_against_the_command_windows() -> None:
    t0 = 1000.0
    records = [_record(i, t0 + i * 0.5, 10.0) for i in range(24)]  # one every 0.5 s, 0 to 11.5 s
    windows = [(t0 + 3.0, t0 + 4.0), (t0 + 8.0, t0 + 8.5)]
    quiet, changing = submitted_while(records, windows, tail_s=1.0, since=t0 + 1.0)
    at = [round(r.submitted_at - t0, 1) for r in changing]
    assert at == [3.0, 3.5, 4.0, 4.5, 8.0, 8.5, 9.0]  # each window and the second after it, end excluded
    assert len(quiet) == 24 - 2 - len(changing)  # the lead-in's two jobs (0 and 0.5 s) in neither
    row = jobs_row("steady", quiet, 5.0, 2.0)
    assert row["submitted"] == len(quiet) and row["p99 ms"] == pytest.approx(10.0) and row["failed"] == 0


def test_the_load_generator_collects_no_cycles_during_a_run() -> None:
    import gc

    collected: list[int] = []
    gc.callbacks.append(record := lambda phase, info: collected.append(info["generation"]))
    try:
        with collector_paused():
            garbage: list[list[object]] = [[] for _ in range(100_000)]
            for item in garbage:
                item.append(item)  # cycles: enough allocations to start many collections
            del garbage
            assert not collected and not gc.isenabled()
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(record)


def test_worker_means_come_from_the_difference_of_two_metrics_snapshots() -> None:
    def exposition(batches: int, images: int, decode_s: float) -> str:
        return (
            "# TYPE hotswap_batch_size histogram\n"
            f'hotswap_batch_size_sum{{model="shapes"}} {images}\nhotswap_batch_size_count{{model="shapes"}} {batches}\n'
            "# TYPE hotswap_job_phase_seconds histogram\n"
            f'hotswap_job_phase_seconds_sum{{model="shapes",phase="decode"}} {decode_s}\n'
            f'hotswap_job_phase_seconds_count{{model="shapes",phase="decode"}} {images}\n'
        )

    before, after = histogram_totals(exposition(10, 20, 0.02)), histogram_totals(exposition(20, 80, 0.08))
    assert before["batch"] == (20.0, 10.0)
    means = worker_means(before, after)
    assert means["mean_batch"] == pytest.approx(6.0)  # 60 images in 10 batches
    assert means["decode_ms"] == pytest.approx(1.0)


def test_visible_after_is_the_slowest_workers_swap() -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    command = Command(command_id="c1", model="shapes", seq=3, issued_at=issued, issuer="bench", action=Rollback())
    report = WaitReport(command, published_at=0.0)

    def progress(worker: str, phase: str, ms: float) -> Progress:
        return Progress(worker_id=worker, command_id="c1", model="shapes", seq=3, phase=phase,
                        at=issued + timedelta(milliseconds=ms))

    report.progress = {"w1": [progress("w1", "received", 5), progress("w1", "swap", 20)],
                       "w2": [progress("w2", "swap", 45), progress("w2", "done", 50)]}
    assert visible_after_ms(report) == pytest.approx(45.0)
    report.progress["w3"] = [progress("w3", "received", 5)]
    assert visible_after_ms(report) is None  # a worker that never swapped


def test_parse_only() -> None:
    assert parse_only(None) == [1, 2, 3, 4, 5, 6, 7]
    assert parse_only(" 3, 1,3 ") == [1, 3]
    with pytest.raises(BenchSetupError, match="unknown benchmark '9'"):
        parse_only("1,9")


def test_the_trivial_model_loads_from_a_repository_and_predicts_without_torch(tmp_path: Path) -> None:
    write_trivial_model(tmp_path)
    repository = ModelRepository(tmp_path)
    entry = repository.get("trivial", "1.0.0")
    assert (entry.manifest.backend, entry.manifest.task, entry.manifest.calibration) == ("trivial", "detect", None)
    backend = create_backend(entry.manifest.backend, "cpu")
    assert isinstance(backend, TrivialBackend)
    backend.load(repository.verified_artifact(entry), entry.manifest)
    backend.warm_up()
    images = [np.zeros((40, 60, 3), dtype=np.uint8), np.zeros((32, 32, 3), dtype=np.uint8)]
    assert [len(found) for found in backend.predict(images, InferenceParams())] == [0, 0]
    backend.release()
    with pytest.raises(BackendError, match="not loaded"):
        backend.predict(images, InferenceParams())


def test_the_trivial_model_can_answer_one_whole_image_box(tmp_path: Path) -> None:
    write_trivial_model(tmp_path)
    entry = ModelRepository(tmp_path).get("trivial", "1.0.0")
    artifact = tmp_path / "whole.json"
    artifact.write_bytes(trivial_artifact(whole_image=True))
    backend = TrivialBackend("cpu")
    backend.load(artifact, entry.manifest)
    [found] = backend.predict([np.zeros((40, 60, 3), dtype=np.uint8)], InferenceParams())
    assert (found.class_ids.tolist(), found.boxes.tolist()) == ([0], [[0.0, 0.0, 60.0, 40.0]])


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x80\x02 a pickle", "not JSON"),
    (b'{"kind": "ultralytics"}', "not a trivial model"),
    (b'["trivial"]', "not a trivial model"),
    (b'{"kind": "trivial", "whole_image": "yes"}', "true or false"),
])
def test_the_trivial_backend_refuses_a_wrong_artifact(tmp_path: Path, content: bytes, reason: str) -> None:
    write_trivial_model(tmp_path)
    manifest = ModelRepository(tmp_path).get("trivial", "1.0.0").manifest
    artifact = tmp_path / "wrong.bin"
    artifact.write_bytes(content)
    with pytest.raises(BackendError, match=reason):
        TrivialBackend("cpu").load(artifact, manifest)
    with pytest.raises(BackendError, match="does not exist"):
        TrivialBackend("cpu").load(tmp_path / "missing.json", manifest)
    segment = Manifest.model_validate({**manifest.model_dump(), "task": "segment"})
    artifact.write_bytes(trivial_artifact())
    with pytest.raises(BackendError, match="detects"):
        TrivialBackend("cpu").load(artifact, segment)


def test_the_bench_refuses_to_start_without_the_zoo(tmp_path: Path) -> None:
    with pytest.raises(BenchSetupError, match="make zoo"):
        check_zoo(tmp_path)
    result = CliRunner().invoke(app, ["loadtest", "bench", "--quick", "--model-root", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot run the benchmarks" in result.output
    result = CliRunner().invoke(app, ["loadtest", "bench", "--only", "9", "--model-root", str(tmp_path)])
    assert result.exit_code == 2 and "unknown benchmark" in result.output


def test_the_machine_ceiling_is_every_core_busy_with_the_model_at_its_in_process_cost() -> None:
    model = Series("in-process, batch 16", jobs_per_s=[500.0], server_cpu_ms=[2.0])
    pooled = Series("worker", jobs_per_s=[300.0], server_cpu_ms=[3.5], busiest_thread_cpu_ms=[2.5],
                    broker_cpu_ms=[0.8], producer_cpu_ms=[0.5])
    # 4.8 ms of CPU a job in all, 2.5 of it the inference thread's.
    assert pooled.beside_model_cpu_ms == pytest.approx(2.3)
    assert machine_ceiling(model, pooled) == pytest.approx(min(500.0, len(os.sched_getaffinity(0)) * 1000 / 4.3))
    model.jobs_per_s = [100.0]  # the model alone is slower than the cores would allow: it is the bound
    assert machine_ceiling(model, pooled) == pytest.approx(100.0)
    pooled.broker_cpu_ms = []  # a broker elsewhere: its CPU unknown, so no ceiling
    assert machine_ceiling(model, pooled) is None


_INTERRUPTS = """\
           CPU0       CPU1       CPU2
  0:         40          0          0   IO-APIC   2-edge      timer
 36:          0     353954          0   PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
 39:       7117          0          3   PCI-MSIX-0000:00:03.0   2-edge      virtio2-output.0
NMI:          9          0          0   Non-maskable interrupts
LOC:    1049557     974352    1000000   Local timer interrupts
"""


def test_the_model_gets_the_cpu_that_takes_the_fewest_device_interrupts() -> None:
    # The disk's interrupts all go to CPU 1: not the model's, whatever the timer and IPIs say.
    assert quietest_cpu({0, 1}, _INTERRUPTS) == 0
    assert quietest_cpu({0, 1, 2}, _INTERRUPTS) == 2
    assert quietest_cpu({1}, _INTERRUPTS) == 1
    assert quietest_cpu({0, 1}, "") == 1  # nothing known: the last, as before


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the model, one for the rest")
def test_the_model_gets_a_cpu_of_its_own_and_the_load_generator_keeps_off_it_while_measured(tmp_path: Path) -> None:
    before = os.sched_getaffinity(0)
    env = BenchEnv(url="", model_root=tmp_path, out=tmp_path, device="cpu", quick=True, console=Console(),
                   run_id="x", images=[])
    model_cpu = env.model_cpu
    assert model_cpu == quietest_cpu(before, Path("/proc/interrupts").read_text())
    assert f"the model on CPU {model_cpu}" in env.model_cpu_note()
    with harness_aside(model_cpu):
        assert os.sched_getaffinity(0) == before - {model_cpu}
    assert os.sched_getaffinity(0) == before
    with pytest.raises(RuntimeError), harness_aside(model_cpu):
        raise RuntimeError("a load run that broke")
    assert os.sched_getaffinity(0) == before  # given back whatever happened
    with harness_aside(None):
        assert os.sched_getaffinity(0) == before
    env.pin = False  # --share-cpus
    assert env.model_cpu is None and "no CPU pinned" in env.model_cpu_note()


def _thread_cpus(pid: int) -> dict[int, set[int]]:
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the model, one for the rest")
@pytest.mark.skipif(broker_pid() is None, reason="needs RabbitMQ on this host (CI starts one)")
def test_a_broker_on_this_host_keeps_off_the_model_cpu_while_measured(tmp_path: Path) -> None:
    broker = broker_pid()
    assert broker is not None
    env = BenchEnv(url="", model_root=tmp_path, out=tmp_path, device="cpu", quick=True, console=Console(),
                   run_id="x", images=[])
    model_cpu = env.model_cpu  # read before: inside, this process has one CPU left and would pin none
    assert model_cpu is not None
    before = _thread_cpus(broker)
    with harness_aside(model_cpu):
        during = _thread_cpus(broker)
        assert during and all(cpus and model_cpu not in cpus for cpus in during.values())
    # Each thread gets its own set back (RabbitMQ binds each scheduler to a CPU of its own).
    after = _thread_cpus(broker)
    assert {tid: cpus for tid, cpus in after.items() if tid in before} == before


@pytest.mark.slow
def test_the_footprint_benchmark_compares_a_worker_with_a_bare_process(
    tmp_path: Path, zoo: Path, amqp_url: str
) -> None:
    run = subprocess.run([sys.executable, "-m", "control", "loadtest", "bench", "--only", "7", "--quick",
                          "--out", str(tmp_path), "--model-root", str(zoo), "--amqp-url", amqp_url],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stdout + run.stderr
    (bench,) = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    figures = {m["name"]: m["value"] for m in bench["metrics"]}
    assert set(figures) == {"worker RSS / bare process", "worker start to ready / bare load + warm-up"}
    assert all(0.5 < value < 5 for value in figures.values()), figures
    assert {row["process"] for row in bench["rows"]} == {"bare process", "worker"}


def test_a_profile_window_is_cpu_per_job_by_step_with_what_each_thread_spent_outside_them() -> None:
    from loadtest.bench_profile import per_job

    before = {"steps": {"loop/parse": {"cpu_s": 1.0, "wall_s": 1.1, "count": 10},
                        "control/forward": {"cpu_s": 0.5, "wall_s": 0.6, "count": 4}},
              "threads": {"loop": 5.0, "control": 2.0}}
    after = {"steps": {"loop/parse": {"cpu_s": 1.002, "wall_s": 1.102, "count": 20},
                       "inference/forward": {"cpu_s": 0.01, "wall_s": 0.0105, "count": 2},
                       "inference/nms": {"cpu_s": 0.001, "wall_s": 0.0015, "count": 2},
                       "control/forward": {"cpu_s": 0.5, "wall_s": 0.6, "count": 4}},
             "threads": {"loop": 5.010, "inference": 0.012, "control": 2.0}}
    rows = per_job(before, after, 10)
    assert rows["loop/parse"] == pytest.approx(200.0)
    assert rows["loop/(all)"] == pytest.approx(1000.0)
    assert rows["loop/(outside steps)"] == pytest.approx(800.0)
    assert rows["loop/(waited inside steps)"] == pytest.approx(0.0, abs=1e-6)  # as long on the wall as on the CPU
    assert rows["inference/forward"] == pytest.approx(1000.0)
    assert rows["inference/(outside steps)"] == pytest.approx(100.0)
    # Wall beyond CPU inside its steps, per job: (0.5 + 0.5) ms over 10 jobs; the CPU rows stay CPU.
    assert rows["inference/(waited inside steps)"] == pytest.approx(100.0)
    assert "control/(all)" not in rows and "control/forward" not in rows  # what the window did not use


@pytest.mark.parametrize("decode", [False, True], ids=["transport only", "decoding"])
async def test_the_raw_loops_answer_through_the_broker_as_the_worker_does(
    amqp_url: str, namespace: str, client: Client, heldout: list[HeldOut], tmp_path: Path, decode: bool
) -> None:
    """Benchmark 2's baselines: a real consume → reply → ack loop on the worker's queue; the decoding
    one reads each job and its image, and answers with the worker's result fields."""
    loop = HelperProcess(["loadtest.bench_raw", "--url", amqp_url, "--namespace", namespace, "--model", "trivial",
                          *(["--decode"] if decode else [])], tmp_path / "raw.log")
    await loop.start()
    try:
        results = [await client.submit(held.path, model="trivial") for held in heldout[:2]]
        tiny = write_tiny_pngs(tmp_path / "tiny", count=1)[0]
        results.append(await client.submit(tiny, model="trivial"))
    finally:
        assert await loop.stop() == 0
    assert all((r.status, r.model, r.worker_id) == ("ok", "trivial", "raw") for r in results)
    if not decode:
        assert all(r.image is None and r.version is None for r in results)
        return
    assert [(r.image.width, r.image.height) if r.image else None for r in results] == [(128, 128), (128, 128),
                                                                                        (TINY_SIDE, TINY_SIDE)]
    assert all(r.version == "1.0.0" and r.detections == [] and r.timings.decode_ms > 0 for r in results)
    assert all(r.timings.queue_wait_ms is not None for r in results)


def test_a_family_is_measured_over_whole_passes_of_its_images_on_both_sides(tmp_path: Path, zoo: Path) -> None:
    # Images differ in cost, and a heavy model answers a handful of jobs a run: both sides must
    # average over the same ones.
    assert whole_passes(10.0, 3000.0, 4) == 4  # one pass of a heavy model's four images: 12 s
    assert whole_passes(20.0, 3000.0, 4) == 8
    assert whole_passes(10.0, 8.0, 40) == 40 * 32  # 0.32 s a pass
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(zoo / "_data" / "shapes-heldout" / "images"))[:3]:
        shutil.copy(zoo / "_data" / "shapes-heldout" / "images" / name, images / name)
    measured = measure_backend(zoo / "shapes" / "1.0.0", images, seconds=0.0, device="cpu", threads=1)
    assert measured["images"] == 3 and measured["passes"] == 1
