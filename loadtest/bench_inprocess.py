"""The in-process baselines: a model called in a loop, nothing else.

    python -m loadtest.bench_inprocess --version-dir models/shapes/1.0.0 --images DIR \
        --batch 8 --seconds 8 [--device cpu] [--imgsz 128] [--backend]

Bench 1 measures ultralytics' own `YOLO.predict`. With `--backend` (bench 6, every family), the
version goes through the backend a worker would create for it (`create_backend`, then `load`,
`warm_up`, `predict` on one image at a time, whole passes over them): the model exactly as the pool
runs it, minus the pool.

Run as a process of its own (with no worker running) so it competes with nothing of ours. The
weights are those the worker serves (the version's artifact, verified, on the network its
manifest describes), in a plain `YOLO`. The images are decoded once, up front; one torch thread,
like a worker, and the worker's setting for freed memory (`--keep-freed-mib`, default the
worker's `allocator_keep_mib`): with glibc's own, how often a batch faults its memory in again
depends on what the process allocated before (importing torchvision first made `YOLO.predict`
of batches of 16 about a third faster), so each side gets the same explicit one. Prints one JSON
line: images per second, wall and CPU ms per image, batches and the seconds measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cpus import parse_cpu_list, pin_current_thread
from worker.runtime.memory import keep_freed_memory, return_freed_memory

if TYPE_CHECKING:
    from worker.runtime.backend import ModelBackend


def measure(version_dir: Path, images_dir: Path, batch: int, seconds: float, device: str, imgsz: int,
            threads: int) -> dict[str, float | int]:
    import cv2
    import torch

    from worker.runtime.repository import ModelRepository, RepositoryError
    from worker.runtime.ultralytics_backend import prepare_offline_environment
    from worker.runtime.ultralytics_networks import load_network, yolo_around
    from worker.runtime.weights import ArtifactLoader

    torch.set_num_threads(threads)
    prepare_offline_environment()
    version_dir = version_dir.resolve()
    try:
        repository = ModelRepository(version_dir.parent.parent)
        entry = repository.get(version_dir.parent.name, version_dir.name)
        artifact = repository.verified_artifact(entry)
    except RepositoryError as exc:
        raise SystemExit(f"no usable version at {version_dir}: {exc}") from None
    model = yolo_around(load_network(artifact, entry.manifest, ArtifactLoader()).to(device), entry.manifest)
    files = image_files(images_dir)
    images = [cv2.imread(str(p)) for p in files]
    if not images:
        raise SystemExit(f"no images in {images_dir}")

    def predict(start: int) -> None:
        chunk = [images[(start + i) % len(images)] for i in range(batch)]
        model.predict(chunk, imgsz=imgsz, device=device, conf=0.25, iou=0.7, max_det=300, verbose=False)

    for i in range(5):  # the predictor is built, caches warm
        predict(i * batch)
    done = batches = 0
    started, cpu = time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - started) < seconds:
        predict(done)
        done += batch
        batches += 1
    cpu = time.process_time() - cpu
    return {"images_per_s": done / elapsed, "ms_per_image": 1000 * elapsed / done,
            "cpu_ms_per_image": 1000 * cpu / done, "batch": batch, "batches": batches, "images": done,
            "seconds": elapsed}


def measure_backend(version_dir: Path, images_dir: Path, seconds: float, device: str,
                    threads: int) -> dict[str, float | int]:
    import cv2
    import numpy as np

    from schemas.jobs import InferenceParams

    backend = warmed_backend(version_dir, device, threads)
    images = [np.asarray(cv2.imread(str(p)), dtype=np.uint8) for p in image_files(images_dir)]
    params = InferenceParams()
    backend.predict([images[0]], params)
    done = 0
    started, cpu = time.perf_counter(), time.process_time()
    # Whole passes over the images, as the pool answers them (bench 6): their costs differ (a
    # crowd against a blank frame), and a heavy model gets through only a few in a run.
    while (elapsed := time.perf_counter() - started) < seconds or done % len(images) or done < 2:
        backend.predict([images[done % len(images)]], params)
        done += 1
    cpu = time.process_time() - cpu
    return {"images_per_s": done / elapsed, "ms_per_image": 1000 * elapsed / done,
            "cpu_ms_per_image": 1000 * cpu / done, "batch": 1, "batches": done, "images": done, "seconds": elapsed,
            "passes": done // len(images)}


def warmed_backend(version_dir: Path, device: str, threads: int) -> ModelBackend:
    """The version as a worker's backend serves it: created, loaded (artifact verified), warmed up."""
    import torch

    from worker.runtime.backend import create_backend
    from worker.runtime.repository import ModelRepository

    torch.set_num_threads(threads)
    version_dir = version_dir.resolve()
    repository = ModelRepository(version_dir.parent.parent)
    entry = repository.get(version_dir.parent.name, version_dir.name)
    backend = create_backend(entry.manifest.backend, device, task=entry.manifest.task)
    backend.load(repository.verified_artifact(entry), entry.manifest)
    backend.warm_up()
    return_freed_memory()  # as a worker does once a version is ready
    return backend


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})


def footprint(version_dir: Path, images_dir: Path, device: str, threads: int) -> dict[str, float | int]:
    """What serving the version costs a bare process: the libraries a worker imports, the version
    loaded and warmed up through its backend, a few images predicted; then its resident memory."""
    started = time.perf_counter()
    import aio_pika  # noqa: F401  (a worker has them loaded too: their memory counts on both sides)
    import aiohttp  # noqa: F401
    import cv2
    import numpy as np
    import prometheus_client  # noqa: F401

    from schemas.jobs import InferenceParams

    backend = warmed_backend(version_dir, device, threads)
    ready_s = time.perf_counter() - started
    for path in image_files(images_dir)[:16]:
        backend.predict([np.asarray(cv2.imread(str(path)), dtype=np.uint8)], InferenceParams())
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"rss_kib": rss, "ready_s": ready_s}


def _keep_freed_bytes(mib: int | None) -> int:
    from worker.config import WorkerSettings

    default = WorkerSettings.model_fields["allocator_keep_mib"].default
    return (default if mib is None else mib) * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, required=True, help="<root>/<model>/<version>")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", action="store_true", help="through the worker's backend, one image at a time")
    parser.add_argument("--footprint", action="store_true", help="resident memory once loaded and used (bench 7)")
    parser.add_argument("--cpus", default="", help="run on these CPUs only (taskset -c syntax), as a worker's "
                        "inference thread does with HOTSWAP_INFERENCE_CPUS")
    parser.add_argument("--keep-freed-mib", type=int, default=None,
                        help="freed memory the C heap keeps mapped (default: the worker's allocator_keep_mib)")
    args = parser.parse_args()
    if cpus := parse_cpu_list(args.cpus):
        pin_current_thread(cpus)  # before torch starts a thread: they inherit it
    keep_freed_memory(_keep_freed_bytes(args.keep_freed_mib))
    if args.footprint:
        result = footprint(args.version_dir, args.images, args.device, args.threads)
    elif args.backend:
        result = measure_backend(args.version_dir, args.images, args.seconds, args.device, args.threads)
    else:
        result = measure(args.version_dir, args.images, args.batch, args.seconds, args.device, args.imgsz,
                         args.threads)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
