"""Benchmark 7: what a worker costs beyond the model it serves, against a bare process.

    worker RSS serving one model / a bare process that imports the same libraries and
        loads it in-process                                              goal ≤ 1.15
    worker start to ready / the bare process's start, imports, load and warm-up   goal ≤ 1.3

The worker serves shapes 2.0.0 with the control plane off (`--model` alone), the bench's
settings (one torch thread); its RSS is read once it has answered 48 jobs, its start-up from the
process's launch to `/readyz` answering ready (connecting, declaring, loading, validating and
warming up included). The bare process (`loadtest.bench_inprocess --footprint`) imports torch,
OpenCV, aio-pika, aiohttp and prometheus-client, loads the version through its backend, warms it
up and predicts 16 images; its start-up is from its launch to the end of the warm-up (its own
clock from the first import, plus the interpreter's start measured from outside). Alternated,
`runs` times each, medians compared.
"""

from __future__ import annotations

import statistics
import sys
import time

from loadtest.bench_core import BenchResult, Goal, Metric, ratio
from loadtest.bench_env import BenchEnv, helper_json, rss_kib, warm_up

MODEL, VERSION = "shapes", "2.0.0"


async def footprint_vs_bare(env: BenchEnv) -> BenchResult:
    result = BenchResult(7, "worker footprint vs a bare process")
    runs = 1 if env.quick else 3
    bare_rss, bare_s, worker_rss, worker_s = [], [], [], []
    interpreter_s = await _interpreter_start_s()
    for i in range(runs):
        bare = await helper_json([
            "loadtest.bench_inprocess", "--footprint", "--version-dir", str(env.model_root / MODEL / VERSION),
            "--images", str(env.images[0].parent), "--device", env.device, "--threads", "1",
        ], timeout_s=300)
        bare_rss.append(int(bare["rss_kib"]))
        bare_s.append(float(bare["ready_s"]) + interpreter_s)
        rss, seconds = await _worker(env, f"footprint{i}")
        worker_rss.append(rss)
        worker_s.append(seconds)
    rows = [("bare process", bare_rss, bare_s), ("worker", worker_rss, worker_s)]
    result.rows = [{"process": name, "RSS MiB": statistics.median(rss) / 1024, "start to ready s": statistics.median(s),
                    "runs": len(rss)} for name, rss, s in rows]
    result.metrics += [
        Metric("worker RSS / bare process", ratio(statistics.median(worker_rss), statistics.median(bare_rss)),
               Goal("<=", 1.15)),
        Metric("worker start to ready / bare load + warm-up", ratio(statistics.median(worker_s),
                                                                    statistics.median(bare_s)), Goal("<=", 1.3)),
    ]
    result.notes.append(f"{MODEL} {VERSION}, one torch thread, control plane off; the interpreter's own start "
                        f"({interpreter_s:.2f} s, `python -c pass`) is added to the bare process's clock")
    return result


async def _worker(env: BenchEnv, tag: str) -> tuple[int, float]:
    namespace = env.namespace(tag)
    worker = env.worker(namespace, "w", [f"{MODEL}@{VERSION}"])
    started = time.perf_counter()
    await env.start(worker)
    seconds = time.perf_counter() - started
    try:
        await warm_up(env, namespace, MODEL)
        assert worker.process is not None
        return rss_kib(worker.process.pid), seconds
    finally:
        await env.stop(worker)
        await env.cleanup(namespace, MODEL)


async def _interpreter_start_s() -> float:
    import asyncio

    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await process.wait()
    return time.perf_counter() - started
