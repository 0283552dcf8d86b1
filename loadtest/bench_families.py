"""Benchmark 6: every model family, the pool against the same model called in-process.

For each family the zoo holds (YOLO detect, segment and pose; faces through modelscope; with the
large zoo, MogFace and M2FP), one worker with micro-batching off serves a closed loop of jobs,
and the version's own backend runs the same images in a process of its own (`bench_inprocess
--backend`), never both at once. The pool's own cost (transport, decoding, encoding the task's
output, masks included) is what separates the two: beside a heavy model it should vanish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench_core import BenchResult, Goal, Metric, ratio
from loadtest.bench_env import BenchEnv, BenchError, helper_json, inference_cpus, pinned_to, warm_up
from loadtest.bench_throughput import Series, measured_load
from loadtest.runner import LoadShape, find_images
from worker.runtime.repository import ModelRepository, RepositoryError


@dataclass(frozen=True)
class Family:
    model: str
    #: Where its images come from: the held-out shapes, or ultralytics' bundled photos.
    photos: bool
    heavy: bool = False

    @property
    def goal(self) -> float:
        return 0.95 if self.heavy else 0.9


FAMILIES = (
    Family("shapes", photos=False), Family("shapes-seg", photos=False), Family("shapes-pose", photos=False),
    Family("faces", photos=True), Family("faces-mtcnn", photos=True),
    Family("mogface", photos=True, heavy=True), Family("parsing", photos=True, heavy=True),
)


def _photos() -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets"


def _version(env: BenchEnv, model: str) -> str | None:
    try:
        return ModelRepository(env.model_root).latest(model)
    except RepositoryError:
        return None


async def families_vs_inprocess(env: BenchEnv) -> BenchResult:
    result = BenchResult(6, "every family: pool vs in-process")
    present = [(f, v) for f in FAMILIES if (v := _version(env, f.model)) is not None]
    for family, version in present:
        version_dir = env.model_root / family.model / version
        # A heavy model on the full-size photos takes up to 40 s an image here: its own calibration
        # images (the photos scaled to 320 px) keep a run to minutes.
        images_dir = (version_dir / "calibration" if family.heavy and (version_dir / "calibration").is_dir()
                      else _photos() if family.photos else env.images[0].parent)
        inprocess = Series(f"{family.model}/{version} in-process")
        pooled = Series(f"{family.model}/{version} worker, max_batch 1")
        # This machine's speed drifts by several per cent from one run to the next: a light family
        # is measured twice, in-process then pool, then pool then in-process (a heavy one takes
        # minutes a run: once).
        ms_per_image = await _inprocess(env, family, version_dir, images_dir, inprocess)
        await _pool(env, family, version, images_dir, ms_per_image, pooled)
        if not (family.heavy or env.quick):
            await _pool(env, family, version, images_dir, ms_per_image, pooled)
            await _inprocess(env, family, version_dir, images_dir, inprocess)
        result.rows += [inprocess.row(), pooled.row()]
        result.metrics.append(Metric(f"{family.model}: pool / in-process", ratio(pooled.rate, inprocess.rate),
                                     Goal(">=", family.goal)))
    missing = [f.model for f in FAMILIES if f.model not in {p.model for p, _ in present}]
    if missing:
        result.notes.append(f"not in the zoo, not measured: {', '.join(missing)} "
                            "(mogface and parsing: `hotswap zoo build --large`)")
    result.notes.append("one worker, HOTSWAP_MAX_BATCH=1, a closed loop of 4 jobs in flight (2 for heavy models: "
                        "one decoding while one runs); in-process: the version's backend on pre-decoded images, "
                        "one at a time, the worker's setting for freed memory; both sides whole passes over the "
                        "same images; a light family twice in alternate order (in-process, pool, pool, "
                        "in-process; --quick: once), the means compared")
    result.notes.append(env.model_cpu_note())
    return result


async def _inprocess(env: BenchEnv, family: Family, version_dir: Path, images_dir: Path, series: Series) -> float:
    """The version's backend on the images in a process of its own, added to `series`; its ms per image."""
    # A heavy model answers a job in seconds: enough of them to count, still a bounded run.
    baseline = await helper_json([
        "loadtest.bench_inprocess", "--backend", "--version-dir", str(version_dir),
        "--images", str(images_dir), "--seconds", str(20.0 if family.heavy else 6.0 if env.quick else 10.0),
        "--device", env.device, "--threads", "1", *pinned_to(env.model_cpu),
    ], timeout_s=900)
    series.jobs_per_s.append(float(baseline["images_per_s"]))
    series.server_cpu_ms.append(float(baseline["cpu_ms_per_image"]))
    return float(baseline["ms_per_image"])


def whole_passes(seconds: float, ms_per_image: float, images: int) -> int:
    """Jobs for a run of at least `seconds` at `ms_per_image` that sends each image equally often:
    images differ in cost (a crowd against a blank frame), and with a heavy model a run is a few
    jobs, so both sides must answer the same ones (`bench_inprocess --backend` runs whole passes)."""
    return images * max(1, math.ceil(seconds * 1000 / (max(ms_per_image, 1e-3) * images)))


async def _pool(env: BenchEnv, family: Family, version: str, images_dir: Path, ms_per_image: float,
                series: Series) -> None:
    """One worker serving the version, fed whole passes over the images; the run added to `series`."""
    namespace = env.namespace(f"family-{family.model}")
    images = find_images(images_dir)
    # Long enough for a few heavy jobs (MogFace with random weights: 37 s each here), a few
    # seconds of light ones; whole passes over the images, as in-process.
    seconds = max((4 if family.heavy else 20) * ms_per_image / 1000, 6.0 if env.quick else 10.0)
    worker = env.worker(namespace, family.model, [f"{family.model}@{version}"],
                        env={"HOTSWAP_MAX_BATCH": "1", **inference_cpus(env.model_cpu)})
    await env.start(worker, timeout_s=600)
    try:
        await warm_up(env, namespace, family.model, jobs=4 if family.heavy else 24)
        assert worker.process is not None
        shape = LoadShape(model=family.model, images=images, concurrency=2 if family.heavy else 4,
                          jobs=whole_passes(seconds, ms_per_image, len(images)),
                          job_timeout_s=max(30.0, ms_per_image / 100),
                          grace_s=max(30.0, ms_per_image / 250))
        run, use = await measured_load(env, namespace, family.model, worker.process.pid, series.label, shape,
                                       aside=env.model_cpu)
    finally:
        await env.stop(worker)
        await env.cleanup(namespace, family.model)
    if run.lost or run.failed:
        raise BenchError(f"{series.label}: {run.lost} lost, {run.failed} failed jobs")
    series.add_run(run, use, {})

