"""The shipped broker definitions (ops/rabbitmq/definitions.json), imported into the real local
RabbitMQ and held to what they promise with real connections: each role is refused, by the
broker's ACCESS_REFUSED, what it must not do, and the whole path works under them (a producer's
job served by a worker, an operator's update reaching it).

The definitions live in their own vhost `hotswap`, which no other test uses; `import_definitions`
merges into what the broker has (it deletes nothing), so guest and `/` are untouched: checked too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused

from control.client import Client
from control.operator import Operator
from control.processes import WorkerProcess
from schemas.control import Update
from schemas.jobs import JobResult
from schemas.signing import KeyFiles, Signer, Verifier
from schemas.topology import Topology
from worker.app import Worker
from worker.config import WorkerSettings
from worker.declarer import Declarer
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import RoundTrip

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO / "ops" / "rabbitmq" / "definitions.json"
VHOST = "hotswap"
TOPOLOGY = Topology("hotswap")
#: The local/dev passwords the definitions' hashes were made from (ops/rabbitmq/README.md).
PASSWORDS = {"hotswap-producer-a": "dev-producer-a", "hotswap-producer-b": "dev-producer-b",
             "hotswap-worker": "dev-worker", "hotswap-operator": "dev-operator", "hotswap-scaler": "dev-scaler"}

Act = Callable[[AbstractChannel], Awaitable[object]]


def _load_hasher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hash_password", DEFINITIONS.parent / "hash_password.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return loaded


def url_of(amqp_url: str, user: str, *, password: str | None = None, vhost: str = VHOST) -> str:
    parsed = urlparse(amqp_url)
    secret = PASSWORDS[user] if password is None else password
    credentials = f"{user}:{secret}" if secret else user
    return f"amqp://{credentials}@{parsed.hostname or '127.0.0.1'}:{parsed.port or 5672}/{vhost}"


def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH: these tests import definitions into the local broker")
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def _permissions_held() -> set[tuple[str, ...]]:
    listed = rabbitmqctl("list_permissions", "--vhost", VHOST, "--no-table-headers", "--quiet")
    return {tuple(line.split("\t")) for line in listed.strip().splitlines()}


@pytest.fixture(scope="module")
async def imported(amqp_url: str) -> str:
    """The definitions imported (an absolute path: rabbitmqctl runs from the broker's own directory).
    The import is asynchronous: wait until the broker holds the file's permissions, not an earlier
    import's, and its users can log in."""
    rabbitmqctl("import_definitions", str(DEFINITIONS))
    wanted = {(p["user"], p["configure"], p["write"], p["read"]) for p in _definitions()["permissions"]}
    async with asyncio.timeout(60):
        while not wanted <= _permissions_held():  # another user's rows may be there too
            await asyncio.sleep(0.5)
        while True:
            try:
                connection = await aio_pika.connect(url_of(amqp_url, "hotswap-operator"))
            except aio_pika.exceptions.AMQPConnectionError:  # its password not imported yet
                await asyncio.sleep(0.5)
                continue
            await connection.close()
            return amqp_url


@pytest.fixture
def model() -> str:
    return f"perm-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def job_queue(imported: str, model: str) -> AsyncIterator[str]:
    """A model's job queue, declared as a worker declares it (with the worker user); removed after."""
    connection = await aio_pika.connect(url_of(imported, "hotswap-worker"))
    async with connection:
        await Declarer(await connection.channel(), TOPOLOGY).job_queue(model, delivery_limit=3)
    yield TOPOLOGY.job_queue(model)
    for name in (TOPOLOGY.job_queue(model), TOPOLOGY.dead_letter_queue(model)):
        rabbitmqctl("delete_queue", "--vhost", VHOST, name)


async def refusal(url: str, act: Act) -> str:
    """What the broker says when `act` runs on a fresh channel as the URL's user: it must be ACCESS_REFUSED."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused) as caught:
            await act(channel)
    text = str(caught.value)
    assert "ACCESS_REFUSED" in text, text
    return text


def publish_to(exchange: str, routing_key: str = "") -> Act:
    async def act(channel: AbstractChannel) -> object:
        target = await channel.get_exchange(exchange, ensure=False)
        return await target.publish(aio_pika.Message(b"{}"), routing_key=routing_key)
    return act


async def _ignore(message: AbstractIncomingMessage) -> None:
    pass


def consume_from(queue: str) -> Act:
    async def act(channel: AbstractChannel) -> object:
        return await (await channel.get_queue(queue, ensure=False)).consume(_ignore)
    return act


def get_from(queue: str) -> Act:
    async def act(channel: AbstractChannel) -> object:
        return await (await channel.get_queue(queue, ensure=False)).get(no_ack=True, fail=False)
    return act


# --- the file itself -------------------------------------------------------------------------------


def test_each_hash_is_its_dev_password_and_guest_is_not_redefined() -> None:
    matches = _load_hasher().matches
    users = {u["name"]: u for u in _definitions()["users"]}
    assert set(users) == set(PASSWORDS)  # guest is not in the file: importing it leaves guest alone
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert matches(PASSWORDS[name], user["password_hash"]), name


def test_policies_agree_with_what_the_declarer_sets() -> None:
    """Arguments win over policies for the dead-letter exchange (and the lower delivery limit wins):
    the policy is the same as the declarer's defaults, so both say one thing."""
    policies = {p["name"]: p for p in _definitions()["policies"]}
    declared = Declarer(None, TOPOLOGY).job_queue_arguments("shapes", WorkerSettings().delivery_limit)  # type: ignore[arg-type]
    jobs = policies["hotswap-jobs"]["definition"]
    assert jobs == {"delivery-limit": declared["x-delivery-limit"],
                    "dead-letter-exchange": declared["x-dead-letter-exchange"]}
    assert "max-age" not in policies["hotswap-control-log"]["definition"]  # the log is the desired state


async def test_the_policies_apply_where_they_should(imported: str, job_queue: str, model: str) -> None:
    listed = rabbitmqctl("list_queues", "--vhost", VHOST, "--no-table-headers", "--quiet", "name", "policy")
    policy = dict(line.partition("\t")[::2] for line in listed.strip().splitlines())  # no policy: ""
    assert policy[job_queue] == "hotswap-jobs"
    assert policy[TOPOLOGY.dead_letter_queue(model)] == ""  # dead letters go nowhere further
    assert policy[TOPOLOGY.control_log] == "hotswap-control-log"


@pytest.mark.parametrize(("argument", "deliveries"), [(2, 3), (5, 4)])
async def test_the_lower_delivery_limit_wins_between_policy_and_argument(
    imported: str, argument: int, deliveries: int
) -> None:
    """What the README says of `x-delivery-limit` against the policy's 3: a message rejected back
    into its queue each time is delivered limit + 1 times, then dead-lettered."""
    name = f"hotswap.jobs.limit-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(url_of(imported, "hotswap-worker"))
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True,
                                            arguments={"x-queue-type": "quorum", "x-delivery-limit": argument})
        await channel.default_exchange.publish(aio_pika.Message(b"poison"), routing_key=name)
        seen = 0
        async with asyncio.timeout(30):
            while (message := await _next(queue)) is not None:
                seen += 1
                await message.reject(requeue=True)
        await queue.delete(if_unused=False, if_empty=False)
    assert seen == deliveries


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage | None:
    """The next message, or None once the queue stays empty a while (a requeue takes a moment)."""
    for _ in range(10):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    return None


# --- denials -----------------------------------------------------------------------------------------


async def test_a_producer_may_not_command_nor_read_another_producers_results(imported: str) -> None:
    producer_a = url_of(imported, "hotswap-producer-a")
    async with Client(url_of(imported, "hotswap-producer-b"), namespace="hotswap") as other:
        said = await refusal(producer_a, consume_from(other.reply_queue))
        assert f"queue '{other.reply_queue}' in vhost 'hotswap'" in said
    said = await refusal(producer_a, publish_to(TOPOLOGY.control_exchange))
    assert "exchange 'hotswap.control' in vhost 'hotswap'" in said
    # Nor take another producer's reply queue name before it does.
    taken = "hotswap.reply.hotswap-producer-b.squatted"
    said = await refusal(producer_a, lambda channel: channel.declare_queue(taken, durable=True))
    assert f"queue '{taken}' in vhost 'hotswap'" in said


async def test_a_worker_may_not_publish_jobs_nor_commands(imported: str) -> None:
    worker = url_of(imported, "hotswap-worker")
    said = await refusal(worker, publish_to(TOPOLOGY.jobs_exchange, "shapes"))
    assert "exchange 'hotswap.jobs' in vhost 'hotswap'" in said
    said = await refusal(worker, publish_to(TOPOLOGY.control_exchange))
    assert "exchange 'hotswap.control' in vhost 'hotswap'" in said


async def test_an_operator_may_not_consume_jobs(imported: str, job_queue: str) -> None:
    said = await refusal(url_of(imported, "hotswap-operator"), consume_from(job_queue))
    assert f"queue '{job_queue}' in vhost 'hotswap'" in said


async def test_the_scaler_reads_a_queue_length_and_nothing_else(imported: str, job_queue: str) -> None:
    """KEDA's trigger (ops/k8s/scaledobject.yaml, protocol amqp) reads a queue's length by a passive
    declare, which RabbitMQ checks no permission for: its user, with no grant, gets the length,
    and may neither take a job, nor publish one, nor declare anything."""
    connection = await aio_pika.connect(url_of(imported, "hotswap-worker"))
    async with connection:  # a job waiting, put there as a worker may (the default exchange)
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=job_queue)
    scaler = url_of(imported, "hotswap-scaler")
    connection = await aio_pika.connect(scaler)
    async with connection:
        queue = await (await connection.channel()).declare_queue(job_queue, passive=True)
        assert queue.declaration_result.message_count == 1
    said = await refusal(scaler, get_from(job_queue))
    assert f"queue '{job_queue}' in vhost 'hotswap'" in said
    said = await refusal(scaler, consume_from(job_queue))
    assert f"queue '{job_queue}' in vhost 'hotswap'" in said
    said = await refusal(scaler, publish_to(TOPOLOGY.jobs_exchange, "shapes"))
    assert "exchange 'hotswap.jobs' in vhost 'hotswap'" in said
    said = await refusal(scaler, lambda channel: channel.declare_queue(f"{job_queue}.squatted", durable=True))
    assert "in vhost 'hotswap'" in said


async def test_nobody_may_delete_the_shared_exchanges(imported: str) -> None:
    """No role configures what the definitions made: a producer cannot remove the jobs exchange."""
    for user in PASSWORDS:
        said = await refusal(url_of(imported, user), lambda channel: channel.exchange_delete(TOPOLOGY.jobs_exchange))
        assert "exchange 'hotswap.jobs' in vhost 'hotswap'" in said


async def test_importing_left_guest_and_the_default_vhost_alone(imported: str, round_trip: RoundTrip) -> None:
    connection = await aio_pika.connect(imported)  # guest on `/`, as every other test connects
    async with connection:
        assert await round_trip(connection, b"still here") == b"still here"


# --- the legitimate paths ------------------------------------------------------------------------------


@pytest.fixture
async def worker(imported: str, model: str, job_queue: str, tmp_path: Path, control_keys: KeyFiles,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Worker]:
    """A whole worker, its settings from the environment as `hotswap worker` takes them: the worker
    user in vhost hotswap, namespace hotswap, a trivial model of this test's own name."""
    for version in ("1.0.0", "2.0.0"):
        write_trivial_model(tmp_path / "models", version, name=model, whole_image=True)
    for key, value in {"HOTSWAP_AMQP_URL": url_of(imported, "hotswap-worker"), "HOTSWAP_NAMESPACE": "hotswap",
                       "HOTSWAP_MODELS": f"{model}@1.0.0", "HOTSWAP_MODEL_ROOT": str(tmp_path / "models"),
                       "HOTSWAP_CONTROL_PUBLIC_KEY": str(control_keys.control_public),
                       "HOTSWAP_WORKER_ID": "least-privilege", "HOTSWAP_STATUS_PORT": "0",
                       "HOTSWAP_HEARTBEAT_INTERVAL_S": "0.5"}.items():
        monkeypatch.setenv(key, value)
    served = Worker(WorkerSettings())
    task = asyncio.create_task(served.run(handle_signals=False))
    async with asyncio.timeout(60):
        while served.not_ready_reasons():
            if task.done():
                task.result()  # raises what stopped it (an ACCESS_REFUSED, say)
            await asyncio.sleep(0.05)
    yield served
    served.stopping.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 30)


async def test_a_producers_job_is_served_and_an_operators_update_reaches_the_worker(
    imported: str, model: str, worker: Worker, control_keys: KeyFiles, bus_jpg: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Client(url_of(imported, "hotswap-producer-a"), namespace="hotswap", timeout_s=30) as client:
        first = await client.submit(bus_jpg, model=model)
        assert (first.status, first.version) == ("ok", "1.0.0"), first.error
        # The operator's password from a file (HOTSWAP_AMQP_PASSWORD_FILE), as a mounted secret gives it.
        secret = tmp_path / "operator.password"
        secret.write_text(PASSWORDS["hotswap-operator"] + "\n")
        monkeypatch.setenv("HOTSWAP_AMQP_PASSWORD_FILE", str(secret))
        async with Operator(url_of(imported, "hotswap-operator", password=""), namespace="hotswap",
                            signer=Signer.from_file(control_keys.control_key), issuer="tests",
                            workers=Verifier.from_file(control_keys.worker_public)) as operator:
            monkeypatch.delenv("HOTSWAP_AMQP_PASSWORD_FILE")
            report = await operator.publish_and_wait(model, Update(version="2.0.0"), timeout_s=60)
        assert report.ok and report.workers == ["least-privilege"], (report.failures, report.missing)
        second = await client.submit(bus_jpg, model=model)
        assert (second.status, second.version) == ("ok", "2.0.0"), second.error
        # A reconnect restores what each declared, passive checks included, under the same permissions.
        # Served only once the worker's consumer is back, and the result reaches the client's restored queue.
        rabbitmqctl("close_all_connections", "--vhost", VHOST, "least-privilege test: reconnect")
        third = await client.submit(bus_jpg, model=model, timeout_s=30)
        assert (third.status, third.version) == ("ok", "2.0.0"), third.error


@pytest.mark.slow
async def test_hotswap_worker_and_submit_take_their_users_and_password_files_from_the_environment(
    imported: str, model: str, job_queue: str, tmp_path: Path, control_keys: KeyFiles, bus_jpg: Path,
) -> None:
    """`python -m worker` and `hotswap submit` as processes: the user and vhost from HOTSWAP_AMQP_URL,
    the password only in HOTSWAP_AMQP_PASSWORD_FILE, as a deployment hands them over."""
    write_trivial_model(tmp_path / "models", "1.0.0", name=model, whole_image=True)
    secrets = {user: tmp_path / f"{user}.password" for user in ("hotswap-worker", "hotswap-producer-b")}
    for user, path in secrets.items():
        path.write_text(PASSWORDS[user] + "\n")
    process = WorkerProcess(models=[f"{model}@1.0.0"], log_path=tmp_path / "worker.log", env={
        "HOTSWAP_AMQP_URL": url_of(imported, "hotswap-worker", password=""),
        "HOTSWAP_AMQP_PASSWORD_FILE": str(secrets["hotswap-worker"]), "HOTSWAP_NAMESPACE": "hotswap",
        "HOTSWAP_MODEL_ROOT": str(tmp_path / "models"), "HOTSWAP_WORKER_ID": "least-privilege-process",
        "HOTSWAP_CONTROL_PUBLIC_KEY": str(control_keys.control_public)})
    process.start()
    try:
        env = {**os.environ, "HOTSWAP_AMQP_URL": url_of(imported, "hotswap-producer-b", password=""),
               "HOTSWAP_AMQP_PASSWORD_FILE": str(secrets["hotswap-producer-b"])}
        command = [sys.executable, "-m", "control", "submit", str(bus_jpg), "--model", model, "--json",
                   "--timeout", "30"]
        done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True,
                                       timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        result = JobResult.model_validate_json(done.stdout.strip().splitlines()[-1])
        assert (result.status, result.version, result.worker_id) == ("ok", "1.0.0", "least-privilege-process")
    finally:
        process.stop(timeout_s=15)
