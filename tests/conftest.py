"""Shared fixtures: the real broker, the zoo's real models, worker processes, a client.

Every test that touches AMQP gets a namespace of its own, so its exchanges and queues never
meet another test's; they are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import aio_pika
import pytest

from control.client import Client
from control.processes import WorkerProcess
from control.zoo import ensure_zoo
from schemas.topology import Topology

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("HOTSWAP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ULTRALYTICS_ASSETS = Path(__import__("ultralytics").__file__).parent / "assets"


@dataclass(frozen=True)
class HeldOut:
    path: Path
    boxes: list[tuple[str, tuple[float, float, float, float]]]


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
    return ensure_zoo(Path(os.environ.get("HOTSWAP_TEST_ZOO", REPO / "models")).resolve())


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


@pytest.fixture
async def namespace(amqp_url: str) -> AsyncIterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_namespace(amqp_url, name, models=["shapes", "other"])


async def delete_namespace(amqp_url: str, namespace: str, models: list[str]) -> None:
    topology = Topology(namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in [q for m in models for q in (topology.job_queue(m), topology.dead_letter_queue(m))]:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):  # never declared
                await channel.queue_delete(name)
        for name in (topology.jobs_exchange, topology.dead_letter_exchange):
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.exchange_delete(name)


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(
    namespace: str, zoo: Path, amqp_url: str, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start `python -m worker` processes in this test's namespace; all are stopped afterwards."""
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
                "HOTSWAP_MODEL_ROOT": str(zoo),
                "HOTSWAP_WORKER_ID": worker_id,
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


@pytest.fixture
async def client(namespace: str, amqp_url: str) -> AsyncIterator[Client]:
    async with Client(amqp_url, namespace=namespace, timeout_s=60) as c:
        yield c
