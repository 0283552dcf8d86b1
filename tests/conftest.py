"""Shared fixtures: the real broker, the zoo's real models, worker processes, a client.

Every test that touches AMQP gets a namespace of its own, so its exchanges and queues never
meet another test's; they are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Unpack
from urllib.parse import urlparse

import aio_pika
import aiohttp
import numpy as np
import pytest
import ultralytics
from prometheus_client.parser import text_string_to_metric_families

from control.client import Client, JobOptions
from control.operator import Operator
from control.processes import WorkerProcess
from control.zoo import ensure_zoo
from schemas.jobs import JobResult
from schemas.manifest import ExpectedObject, Manifest
from schemas.signing import KeyFiles, Signer, Verifier, generate_keys
from schemas.topology import Topology
from worker.app import Worker
from worker.config import WorkerSettings
from worker.runtime.trivial_backend import write_trivial_model

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("HOTSWAP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ULTRALYTICS_ASSETS = Path(ultralytics.__file__).parent / "assets"


@dataclass(frozen=True)
class HeldOut:
    path: Path
    boxes: list[tuple[str, tuple[float, float, float, float]]]

    @property
    def expected(self) -> list[ExpectedObject]:
        return [ExpectedObject(class_name=name, box=box) for name, box in self.boxes]


@pytest.fixture(scope="session")
def amqp_url() -> str:
    parsed = urlparse(AMQP_URL)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL} ({exc}); start it: rabbitmq-server -detached")
    return AMQP_URL


@pytest.fixture(scope="session")
def zoo() -> Path:
    """The demo zoo (`make test` builds it first; building here is the fallback)."""
    return ensure_zoo(_zoo_root())


def _zoo_root() -> Path:
    return Path(os.environ.get("HOTSWAP_TEST_ZOO", REPO / "models")).resolve()


@pytest.fixture(scope="session")
def task_zoo() -> Path:
    """The zoo's segment and pose families (`shapes-seg`, `shapes-pose`) under the test zoo's root:
    `make test` builds them with the rest; building here (cached there) is the fallback. Apart
    from `zoo`, so that these tests need not train the detect family."""
    from control.zoo_tasks import build_tasks

    root = _zoo_root()
    build_tasks(root)
    return root


@pytest.fixture(scope="session")
def heldout(zoo: Path) -> list[HeldOut]:
    directory = zoo / "_data" / "shapes-heldout"
    labels = json.loads((directory / "labels.json").read_text())
    return [
        HeldOut(directory / item["file"], [(b["class_name"], tuple(b["box"])) for b in item["boxes"]])
        for item in labels
    ]


@pytest.fixture(scope="session")
def bus_jpg() -> Path:
    return ULTRALYTICS_ASSETS / "bus.jpg"


#: The ultralytics network class and a packaged config of each task, for `reference_yolo`.
_REFERENCE_TASKS = {"detect": ("DetectionModel", "yolov8n.yaml"), "segment": ("SegmentationModel", "yolov8n-seg.yaml"),
                    "pose": ("PoseModel", "yolov8n-pose.yaml")}


#: `reference`: an in-process ultralytics `YOLO` (untyped) on a zoo version's weights.
Reference = Callable[[Path], Any]
#: `same_as_reference`: asserts a detect result holds what ultralytics' `Boxes` of that image hold.
SameAsReference = Callable[[JobResult, Any, object], None]
#: `trojan`: writes a trojaned checkpoint at a path, with the marker its payload creates.
WriteTrojan = Callable[[Path, Path], Path]


def reference_yolo(version_dir: Path) -> Any:
    """In-process `YOLO.predict` on a zoo version's own weights, nothing unpickled: a YOLO from a
    packaged config of its task, its network rebuilt from the manifest's architecture, the
    safetensors loaded. Built here with ultralytics alone, not with the worker's loading code it
    is compared with."""
    from safetensors.torch import load_file
    from ultralytics import YOLO
    from ultralytics.nn import tasks

    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    assert manifest.format == "safetensors" and manifest.architecture is not None
    model_class, config = _REFERENCE_TASKS[manifest.task]
    yolo = YOLO(config, task=manifest.task)
    network = getattr(tasks, model_class)(copy.deepcopy(manifest.architecture), verbose=False)
    network.load_state_dict(load_file(version_dir / manifest.artifact), strict=True)
    network.names, network.args = dict(manifest.classes), yolo.model.args
    yolo.model = network.eval()
    return yolo


def sort_best_first(boxes: np.ndarray, scores: np.ndarray, *more: np.ndarray) -> tuple[np.ndarray, ...]:
    """Detections in one order, whatever order a model listed them in: best score first, ties by
    the box's top-left corner; `more` (landmarks, say) follows its detections."""
    order = np.lexsort((boxes[:, 1], boxes[:, 0], -scores))
    return boxes[order], scores[order], *(m[order] for m in more)


def modelscope_pipeline(version_dir: Path, tmp_path: Path) -> Any:
    """modelscope's own pipeline on a zoo version's files, as its documentation builds one: a local
    directory with configuration.json and pytorch_model.pt (under `tmp_path`). Written here with
    safetensors and torch alone, not with the backend's code it is compared with."""
    import torch
    from modelscope.pipelines import pipeline
    from safetensors.torch import load_file

    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    config = json.loads(json.dumps(manifest.architecture))
    model_dir = tmp_path / f"in-process-{manifest.name}-{manifest.version}"
    model_dir.mkdir()
    tensors = load_file(version_dir / manifest.artifact)
    if config["pipeline"]["type"] == "m2fp-image-human-parsing":
        config["model"]["pretrained"] = True  # M2FP reads {"model": state dict} only when told to
        torch.save({"model": tensors}, model_dir / "pytorch_model.pt")
    else:
        torch.save(tensors, model_dir / "pytorch_model.pt")
    (model_dir / "configuration.json").write_text(json.dumps(config))
    return pipeline(config["task"], model=str(model_dir.resolve()), device="cpu")


def facenet_mtcnn() -> Any:
    """facenet-pytorch's own `MTCNN` with the zoo's cascade settings, on its own package data (its
    published weights): none of our code is involved. It takes RGB."""
    from facenet_pytorch import MTCNN

    from control.zoo_mtcnn import ARCHITECTURE

    return MTCNN(keep_all=True, select_largest=False, device="cpu", min_face_size=ARCHITECTURE["min_face_size"],
                 thresholds=ARCHITECTURE["thresholds"], factor=ARCHITECTURE["factor"])


#: `best_first`: `sort_best_first`, detections (and what follows them) in one order.
BestFirst = Callable[..., tuple[np.ndarray, ...]]
#: `modelscope_reference`: modelscope's `pipeline` (untyped) on a version's files, in a scratch directory.
ModelscopeReference = Callable[[Path, Path], Any]
#: `mtcnn_reference`: facenet-pytorch's `MTCNN` (untyped) as the zoo's faces-mtcnn configures it.
MtcnnReference = Callable[[], Any]


@pytest.fixture(scope="session")
def best_first() -> BestFirst:
    return sort_best_first


@pytest.fixture(scope="session")
def modelscope_reference() -> ModelscopeReference:
    return modelscope_pipeline


@pytest.fixture(scope="session")
def mtcnn_reference() -> MtcnnReference:
    return facenet_mtcnn


class Trojan:
    """Pickles to a call of `open(marker, "w")`: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def write_trojan(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped pickle (`torch.save`) whose payload, once unpickled, writes `marker`."""
    import torch

    torch.save({"model": Trojan(marker), "date": "2026-01-01"}, path)
    return path


@pytest.fixture(scope="session")
def reference() -> Reference:
    return reference_yolo


def assert_same_as_reference(result: JobResult, theirs: Any, what: object) -> None:
    """The same classes in the same order, boxes within 0.001 px (`theirs`: ultralytics' `Boxes`)."""
    ours = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in result.detections]).reshape(-1, 4)
    assert np.allclose(ours, theirs.xyxy.numpy(), atol=1e-3), what
    assert [d.class_id for d in result.detections] == theirs.cls.numpy().astype(int).tolist(), what


@pytest.fixture(scope="session")
def same_as_reference() -> SameAsReference:
    return assert_same_as_reference


@pytest.fixture(scope="session")
def trojan() -> WriteTrojan:
    return write_trojan


@pytest.fixture(scope="session")
def control_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    """Both key pairs (the operator's control.key and worker.pub, the workers' control.pub and worker.key),
    in one directory: workers find worker.key beside control.pub."""
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def one_torch_thread() -> None:
    """One torch thread, as a worker runs (worker/app.py): two threads contend on two cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def model_root(zoo: Path, tmp_path: Path) -> Path:
    """A repository of this test's own: the zoo's versions (linked), room for crafted ones."""
    root = tmp_path / "models"
    for model in zoo.iterdir():
        if not model.is_dir() or model.name.startswith((".", "_")):
            continue
        (root / model.name).mkdir(parents=True)
        for version in model.iterdir():
            if not version.name.startswith("."):
                (root / model.name / version.name).symlink_to(version, target_is_directory=True)
    return root


#: Every model the zoo builds: a test's namespace may hold a queue for each.
ZOO_MODELS = ("shapes", "shapes-seg", "shapes-pose", "faces", "faces-mtcnn", "mogface", "parsing")


@pytest.fixture
async def namespace(amqp_url: str) -> AsyncIterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_namespace(amqp_url, name, models=[*ZOO_MODELS, "other", "trivial"])


@pytest.fixture
async def operator(amqp_url: str, namespace: str, control_keys: KeyFiles) -> AsyncIterator[Operator]:
    # The test workers beat every 0.5 s: a command's wait need not listen 2.5 s to hear every one.
    async with Operator(amqp_url, namespace=namespace, signer=Signer.from_file(control_keys.control_key),
                        issuer="tests", workers=Verifier.from_file(control_keys.worker_public), settle_s=0.8) as op:
        yield op


async def delete_namespace(amqp_url: str, namespace: str, models: list[str]) -> None:
    topology = Topology(namespace)
    queues = [q for m in models for q in (topology.job_queue(m), topology.dead_letter_queue(m))]
    exchanges = [topology.jobs_exchange, topology.dead_letter_exchange, topology.control_exchange,
                 topology.status_exchange]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in [*queues, topology.control_log]:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):  # never declared
                await channel.queue_delete(name)
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.exchange_delete(name)


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples of a Prometheus text exposition matching a name and labels."""
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class Metric(Protocol):
    """`metric`: `metric_value`, the sum of an exposition's samples of a name and labels."""

    def __call__(self, exposition: str, name: str, **labels: str) -> float: ...


@pytest.fixture(scope="session")
def metric() -> Metric:
    return metric_value


class StartWorker(Protocol):
    """`start_worker`: starts a worker process serving `models` (default `shapes@1.0.0`)."""

    def __call__(self, *models: str, env: dict[str, str] | None = None, args: list[str] | None = None,
                 name: str | None = None) -> WorkerProcess: ...


@pytest.fixture
def start_worker(
    namespace: str, model_root: Path, amqp_url: str, tmp_path: Path, control_keys: KeyFiles
) -> Iterator[StartWorker]:
    """Start `python -m worker` processes in this test's namespace, control plane on; all are
    stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(*models: str, env: dict[str, str] | None = None, args: list[str] | None = None,
              name: str | None = None) -> WorkerProcess:
        worker_id = name or f"w{len(started) + 1}"
        process = WorkerProcess(
            models=list(models) or ["shapes@1.0.0"],
            log_path=tmp_path / f"{worker_id}.log",
            env={
                "HOTSWAP_AMQP_URL": amqp_url,
                "HOTSWAP_NAMESPACE": namespace,
                "HOTSWAP_MODEL_ROOT": str(model_root),
                "HOTSWAP_WORKER_ID": worker_id,
                "HOTSWAP_CONTROL_PUBLIC_KEY": str(control_keys.control_public),
                "HOTSWAP_HEARTBEAT_INTERVAL_S": "0.5",
                **(env or {}),
            },
            args=args or [],
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.alive:
            process.stop(timeout_s=15)


class InProcessWorker(Worker):
    """A `Worker` in the test's own event loop, with the status-page readers `WorkerProcess` has;
    awaited here, since a blocking read would stall the loop the status server runs on."""

    @property
    def url(self) -> str:
        return self.status_url

    async def get(self, path: str, *, ok_only: bool = True) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.status_url + path) as response:
            if ok_only:
                response.raise_for_status()
            return dict(await response.json())

    async def text(self, path: str) -> str:
        async with aiohttp.ClientSession() as http, http.get(self.status_url + path) as response:
            response.raise_for_status()
            return await response.text()


class ServeInProcess(Protocol):
    """`serve_in_process`: a worker in the test's event loop, `WorkerSettings` fields as keywords."""

    def __call__(self, *models: str, name: str | None = None, **settings: object) -> Awaitable[InProcessWorker]: ...


@pytest.fixture
async def serve_in_process(
    namespace: str, amqp_url: str, model_root: Path, control_keys: KeyFiles
) -> AsyncIterator[ServeInProcess]:
    """A whole worker running in the test's own event loop against the real broker, as
    `start_worker` runs one in a process, without a process's start-up: its parts can be
    inspected and patched. It serves `model_root` (the zoo, and `trivial/1.0.0` and
    `trivial/2.0.0`, both answering one whole-image box; the default is `trivial@1.0.0`), or the
    repository given as `model_root=`, control plane on. Settings as keyword arguments
    (`prefetch=4`); stopped afterwards. What needs a process of its own (signals, kill -9, exit
    codes, memory returned to the system, code a pickle runs) uses `start_worker`."""
    root = model_root
    for version in ("1.0.0", "2.0.0"):
        write_trivial_model(root, version, whole_image=True)
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def serve(*models: str, name: str | None = None, **settings: object) -> InProcessWorker:
        settings = {"model_root": root, "control_public_key": control_keys.control_public,
                    "heartbeat_interval_s": 0.5, **settings}
        worker = InProcessWorker(WorkerSettings(
            amqp_url=amqp_url, namespace=namespace, models=list(models) or ["trivial@1.0.0"],
            worker_id=name or f"inproc{len(running) + 1}", status_port=0, **settings,  # type: ignore[arg-type]
        ))
        task = asyncio.create_task(worker.run(handle_signals=False))
        running.append((worker, task))
        async with asyncio.timeout(60):
            while worker.not_ready_reasons():
                if task.done():
                    task.result()  # raises what stopped it
                await asyncio.sleep(0.02)
        return worker

    yield serve
    for worker, task in running:
        worker.stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


class RoundTrip(Protocol):
    """`round_trip`: publishes `body` to a private queue over `connection`, returns what it reads back."""

    def __call__(self, connection: aio_pika.abc.AbstractConnection, body: bytes) -> Awaitable[bytes]: ...


class DeadLetters(Protocol):
    """`dead_letters`: waits until the model's dead-letter queue holds exactly `count` messages
    (read by a passive declare on `channel`); TimeoutError after `timeout_s`."""

    def __call__(self, channel: aio_pika.abc.AbstractChannel, namespace: str, model: str, count: int,
                 timeout_s: float = 10.0) -> Awaitable[None]: ...


@pytest.fixture(scope="session")
def dead_letters() -> DeadLetters:
    return _dead_letters


async def _dead_letters(channel: aio_pika.abc.AbstractChannel, namespace: str, model: str, count: int,
                        timeout_s: float = 10.0) -> None:
    queue = Topology(namespace).dead_letter_queue(model)
    async with asyncio.timeout(timeout_s):
        while (await channel.declare_queue(queue, passive=True)).declaration_result.message_count != count:
            await asyncio.sleep(0.1)


@pytest.fixture(scope="session")
def round_trip() -> RoundTrip:
    return _round_trip


async def _round_trip(connection: aio_pika.abc.AbstractConnection, body: bytes) -> bytes:
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
    async with asyncio.timeout(10):
        while (message := await queue.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    return message.body


@pytest.fixture
async def client(namespace: str, amqp_url: str) -> AsyncIterator[Client]:
    async with Client(amqp_url, namespace=namespace, timeout_s=60) as c:
        yield c


class BackgroundLoad:
    """Jobs submitted continuously (`concurrency` in flight) until stopped; nothing may be lost."""

    def __init__(self, client: Client, images: list[Path], concurrency: int = 8, model: str = "shapes",
                 **options: Unpack[JobOptions]) -> None:
        self.client = client
        self.images = images
        self.model = model
        self.options = options
        self.results: list[tuple[Path, JobResult]] = []  # in arrival order
        #: Each lane's results in its order: a lane submits its next job once the last is answered.
        self.by_lane: dict[int, list[JobResult]] = {}
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(concurrency)]

    async def _loop(self, lane: int) -> None:
        i = lane
        while not self._stop.is_set():
            image = self.images[i % len(self.images)]
            i += len(self._tasks) or 1
            try:
                result = await self.client.submit(image, model=self.model, timeout_s=60, **self.options)
                self.results.append((image, result))
                self.by_lane.setdefault(lane, []).append(result)
            except Exception as exc:  # a timeout is a lost job: the test reports it
                self.errors.append(exc)

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self.results) < count:
            assert asyncio.get_running_loop().time() < deadline, "load stalled"
            await asyncio.sleep(0.05)

    async def stop(self) -> list[JobResult]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert not self.errors, f"lost jobs: {self.errors[:3]}"
        failed = [r for _, r in self.results if r.status != "ok"]
        assert not failed, f"{len(failed)} failed jobs, e.g. {failed[0].error}"
        return [r for _, r in self.results]


class StartLoad(Protocol):
    """`load`: starts a `BackgroundLoad` (default: on the held-out images); stopped afterwards."""

    def __call__(self, concurrency: int = 8, images: list[Path] | None = None, model: str = "shapes",
                 **options: Unpack[JobOptions]) -> BackgroundLoad: ...


@pytest.fixture
async def load(client: Client, heldout: list[HeldOut]) -> AsyncIterator[StartLoad]:
    started: list[BackgroundLoad] = []

    def start(concurrency: int = 8, images: list[Path] | None = None, model: str = "shapes",
              **options: Unpack[JobOptions]) -> BackgroundLoad:
        started.append(BackgroundLoad(client, images or [h.path for h in heldout], concurrency, model, **options))
        return started[-1]

    yield start
    for running in started:
        running._stop.set()
        await asyncio.gather(*running._tasks, return_exceptions=True)
