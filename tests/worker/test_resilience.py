"""Nothing is lost: concurrency, killed workers, graceful stops, broker cuts, poison messages."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Unpack

import aio_pika
import pytest
from aiohttp import web

from control.client import Client, JobOptions
from control.operator import Operator
from control.processes import WorkerProcess
from schemas.control import Update
from schemas.jobs import InlineImage, Job, JobResult
from schemas.signing import KeyFiles, Signer, Verifier
from schemas.topology import Topology
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, Metric, StartWorker

pytestmark = pytest.mark.slow


async def submit_all(client: Client, images: list[Path], count: int, **kwargs: Unpack[JobOptions]) -> list[JobResult]:
    return list(await asyncio.gather(
        *(client.submit(images[i % len(images)], model="shapes", **kwargs) for i in range(count))
    ))


def submit_in_background(
    client: Client, images: list[Path], count: int, answered: list[JobResult]
) -> list[asyncio.Task[JobResult]]:
    """Submit `count` jobs as tasks; each result is appended to `answered` as it arrives."""

    async def one(i: int) -> JobResult:
        result = await client.submit(images[i % len(images)], model="shapes")
        answered.append(result)
        return result

    return [asyncio.create_task(one(i)) for i in range(count)]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_500_concurrent_jobs_two_workers_each_answered_once(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut]
) -> None:
    first, second = start_worker("shapes@1.0.0"), start_worker("shapes@1.0.0")
    results = await submit_all(client, [h.path for h in heldout], 500)
    assert len({r.job_id for r in results}) == 500
    assert all(r.status == "ok" for r in results)
    by_worker = Counter(r.worker_id for r in results)
    assert set(by_worker) == {"w1", "w2"}, by_worker
    await asyncio.sleep(0.5)  # a duplicate, were there one, would have arrived by now
    assert client.duplicates == 0 and client.late == 0
    done = first.get("/status")["jobs_done"] + second.get("/status")["jobs_done"]
    assert done == 500


async def test_a_worker_killed_mid_stream_loses_nothing(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut]
) -> None:
    victim = start_worker("shapes@1.0.0", name="victim", args=["--prefetch", "32"])
    start_worker("shapes@1.0.0", name="survivor")
    answered: list[JobResult] = []
    jobs = submit_in_background(client, [h.path for h in heldout], 400, answered)
    await wait_until(lambda: sum(r.worker_id == "victim" for r in answered) >= 20)
    victim.kill()
    results = await asyncio.gather(*jobs)
    assert all(r.status == "ok" for r in results) and len(results) == 400
    assert any(r.worker_id == "survivor" and r.attempt > 1 for r in results), "the victim held no unacked jobs"


async def test_sigterm_finishes_in_flight_jobs_and_exits_in_time(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut]
) -> None:
    leaving = start_worker("shapes@1.0.0", name="leaving", args=["--prefetch", "32", "--grace-period", "20"])
    answered: list[JobResult] = []
    jobs = submit_in_background(client, [h.path for h in heldout], 300, answered)
    await wait_until(lambda: len(answered) >= 20)
    assert leaving.get("/status")["in_flight"] > 0
    leaving.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert leaving.process is not None
    code = await asyncio.to_thread(leaving.process.wait, 25)
    assert code == 0 and time.monotonic() - stopped_at < 20
    assert "all in-flight jobs answered" in leaving.log_tail(50)
    start_worker("shapes@1.0.0", name="next")
    results = await asyncio.gather(*jobs)
    assert all(r.status == "ok" for r in results)
    # Jobs the leaving worker had taken were answered by it, not redelivered to the next one.
    again = [(r.job_id, r.worker_id, r.attempt) for r in results if r.attempt != 1]
    assert not again, f"redelivered {again}; the leaving worker's log:\n{leaving.log_tail(300)}"
    assert {r.worker_id for r in results} == {"leaving", "next"}


async def test_a_broker_connection_cut_is_survived(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut], amqp_url: str, namespace: str,
    control_keys: KeyFiles
) -> None:
    worker = start_worker("shapes@1.0.0")
    before = await client.submit(heldout[0].path, model="shapes")
    assert before.status == "ok"
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "test: connection cut"], check=True)
    # The worker notices (its not-ready window can be a few milliseconds: too short to poll).
    await wait_until(lambda: "broker connection lost" in worker.log_tail(), timeout_s=10)
    await wait_until(lambda: bool(worker.get("/readyz", ok_only=False).get("ready")), timeout_s=60)
    after = await asyncio.wait_for(client.submit(heldout[1].path, model="shapes"), 60)
    assert after.status == "ok" and after.worker_id == "w1"
    assert "hotswap_broker_connected 1.0" in worker.text("/metrics")
    # The control plane came back too: the worker still follows the control log.
    # A fresh operator connection, as a new CLI invocation after the cut would have.
    async with Operator(amqp_url, namespace=namespace, signer=Signer.from_file(control_keys.control_key),
                        workers=Verifier.from_file(control_keys.worker_public)) as operator:
        report = await operator.publish_and_wait("shapes", Update(version="2.0.0"), timeout_s=60)
    assert report.ok and report.workers == ["w1"], (report.missing, report.failures)
    assert (await client.submit(heldout[2].path, model="shapes")).version == "2.0.0"


async def test_a_message_that_kills_workers_ends_in_the_dead_letter_queue(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut], namespace: str, amqp_url: str
) -> None:
    """A job whose image URL hangs: each worker that takes it is killed (as a supervisor would
    kill a stuck worker); after the quorum delivery limit it is dead-lettered, not retried forever."""
    hung = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        hung.set()
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application()
    app.router.add_get("/hang.png", hang)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hang.png"
    env = {"HOTSWAP_DELIVERY_LIMIT": "1", "HOTSWAP_IMAGE_FETCH_TIMEOUT_S": "3600",
           "HOTSWAP_IMAGE_READ_TIMEOUT_S": "3600", "HOTSWAP_IMAGE_URL_HOSTS": "127.0.0.1:*",
           "HOTSWAP_IMAGE_URL_NETWORKS": "127.0.0.0/8"}
    topology = Topology(namespace)
    poison: asyncio.Task[JobResult] | None = None
    kills = 0
    message = None
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for attempt in range(4):
            worker = start_worker("shapes@1.0.0", env=env, name=f"stuck{attempt}")
            if poison is None:  # the queue exists once the first worker has declared it
                poison = asyncio.create_task(client.submit(url, model="shapes", timeout_s=300))
            await asyncio.wait_for(hung.wait(), 30)
            hung.clear()
            worker.kill()
            kills += 1
            dead_queue = await channel.declare_queue(topology.dead_letter_queue("shapes"), passive=True)
            for _ in range(30):
                message = await dead_queue.get(no_ack=True, fail=False)
                if message is not None:
                    break
                await asyncio.sleep(0.1)
            if message is not None:
                break
        assert message is not None, "the poison job is not in the dead-letter queue"
        assert message.headers.get("x-first-death-reason") == "delivery_limit"
        assert kills == 2, f"delivered {kills} times with a delivery limit of 1"
        assert poison is not None and not poison.done()
        start_worker("shapes@1.0.0", env=env, name="healthy")
        ok = await client.submit(heldout[0].path, model="shapes")
        assert ok.status == "ok"
    finally:
        if poison is not None:
            poison.cancel()
        await connection.close()
        await runner.cleanup()


async def test_a_result_the_broker_refuses_sends_its_job_back_until_it_is_dead_lettered(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut], namespace: str, amqp_url: str, metric: Metric
) -> None:
    """The broker nacks the result (its reply queue is full): the job must not sit unacked on a
    channel that stays open; it goes back to the queue, and the delivery limit ends its retries."""
    worker = start_worker("shapes@1.0.0", env={"HOTSWAP_DELIVERY_LIMIT": "2"})
    topology = Topology(namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        full = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        job = Job(job_id="refused", model="shapes", image=InlineImage(data=heldout[0].path.read_bytes()))
        exchange = await channel.get_exchange(topology.jobs_exchange)
        await exchange.publish(
            aio_pika.Message(job.model_dump_json().encode(), reply_to=full.name, correlation_id=job.job_id),
            routing_key="shapes",
        )
        dead_queue = await channel.declare_queue(topology.dead_letter_queue("shapes"), passive=True)
        dead = None
        for _ in range(300):
            if (dead := await dead_queue.get(no_ack=True, fail=False)) is not None:
                break
            await asyncio.sleep(0.1)
    assert dead is not None and dead.correlation_id == "refused", "the job never left the worker"
    assert dead.headers.get("x-first-death-reason") == "delivery_limit"
    assert metric(worker.text("/metrics"), "hotswap_results_unpublished_total", model="shapes") >= 2
    assert (await client.submit(heldout[1].path, model="shapes")).status == "ok"


async def test_a_result_waits_for_its_reply_queue_and_is_as_durable_as_its_job(
    start_worker: StartWorker, heldout: list[HeldOut], namespace: str, amqp_url: str
) -> None:
    """A client reconnecting after a broker restart declares its reply queue again: a result
    published before that would be confirmed and lost (unroutable). The worker tries again for a
    few seconds instead, and marks a persistent job's result persistent (it survives a restart)."""
    start_worker("shapes@1.0.0")
    topology = Topology(namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.jobs_exchange)
        image = InlineImage(data=heldout[0].path.read_bytes())
        late_queue = f"{namespace}.late-replies"
        for job_id, mode in (("persistent", aio_pika.DeliveryMode.PERSISTENT),
                             ("transient", aio_pika.DeliveryMode.NOT_PERSISTENT)):
            body = Job(job_id=job_id, model="shapes", image=image).model_dump_json().encode()
            await exchange.publish(aio_pika.Message(body, reply_to=late_queue, correlation_id=job_id,
                                                    delivery_mode=mode), routing_key="shapes")
        await asyncio.sleep(1.0)  # the results are ready by now, with nowhere to go
        queue = await channel.declare_queue(late_queue, exclusive=True)
        results = {}
        for _ in range(100):
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                results[message.correlation_id] = message
            if len(results) == 2:
                break
            await asyncio.sleep(0.1)
    assert set(results) == {"persistent", "transient"}, "a result was dropped while its queue was missing"
    assert results["persistent"].delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert results["transient"].delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    for message in results.values():
        assert JobResult.model_validate_json(message.body).attempt == 1  # no requeue was needed


def test_worker_refuses_to_start_with_a_model_it_cannot_load(tmp_path: Path, zoo: Path, amqp_url: str) -> None:
    process = WorkerProcess(
        models=["shapes@7.7.7"], log_path=tmp_path / "w.log",
        env={"HOTSWAP_MODEL_ROOT": str(zoo), "HOTSWAP_AMQP_URL": amqp_url},
    )
    with pytest.raises(Exception, match="not found"):
        process.start(timeout_s=60)
    assert process.process is not None and process.process.returncode == 2


async def test_a_hung_inference_gives_its_jobs_back_says_why_and_exits(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut], model_root: Path
) -> None:
    """A batch that never returns (a stuck GPU call): past HOTSWAP_INFERENCE_TIMEOUT_S the worker
    stops taking jobs, says why on /readyz and /status, and exits (70) so the broker redelivers
    what it held; the healthy worker answers every job."""
    write_trivial_model(model_root, "1.0.0", whole_image=True)
    write_trivial_model(model_root, "0.1.0-stuck", whole_image=True, delay_ms=3_600_000)
    stuck = start_worker("trivial@0.1.0-stuck", name="stuck", args=["--prefetch", "4"],
                         env={"HOTSWAP_INFERENCE_TIMEOUT_S": "2", "HOTSWAP_HUNG_EXIT_DELAY_S": "3"})
    start_worker("trivial@1.0.0", name="healthy")
    jobs = [asyncio.create_task(client.submit(h.path, model="trivial", timeout_s=60)) for h in heldout[:8]]
    def says_hung() -> bool:
        return any("hung" in reason for reason in stuck.get("/readyz", ok_only=False).get("reasons", []))

    await wait_until(says_hung, timeout_s=20)
    assert "HOTSWAP_INFERENCE_TIMEOUT_S" in (stuck.get("/status", ok_only=False).get("hung") or "")
    assert stuck.process is not None
    assert await asyncio.to_thread(stuck.process.wait, 20) == 70
    results = await asyncio.gather(*jobs)
    assert all((r.status, r.worker_id) == ("ok", "healthy") for r in results), results
    assert any(r.attempt > 1 for r in results), "the stuck worker held none of the jobs"


async def test_a_stopped_worker_gives_its_jobs_back_within_the_heartbeat(
    start_worker: StartWorker, client: Client, heldout: list[HeldOut], model_root: Path
) -> None:
    """SIGSTOP (a frozen VM, a swapped-out process): the AMQP heartbeat the worker asks for
    (HOTSWAP_AMQP_HEARTBEAT_S, 10 s by default; 3 s here, to keep the test short) makes the broker
    drop its connection and redeliver its jobs within a few heartbeats, not the minutes of
    RabbitMQ's default."""
    write_trivial_model(model_root, "1.0.0", whole_image=True)
    write_trivial_model(model_root, "0.2.0-slow", whole_image=True, delay_ms=1500)
    frozen = start_worker("trivial@0.2.0-slow", name="frozen", args=["--prefetch", "4"],
                          env={"HOTSWAP_AMQP_HEARTBEAT_S": "3"})
    start_worker("trivial@1.0.0", name="thawed")
    jobs = [asyncio.create_task(client.submit(h.path, model="trivial", timeout_s=90)) for h in heldout[:8]]
    await wait_until(lambda: frozen.get("/status")["in_flight"] > 0, timeout_s=10)
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        results = await asyncio.gather(*jobs)
        waited = time.monotonic() - stopped_at
    finally:
        frozen.signal(signal.SIGCONT)
    print(f"jobs held by the stopped worker came back after {waited:.1f} s")
    assert all(r.status == "ok" for r in results)
    assert any(r.worker_id == "thawed" and r.attempt > 1 for r in results), "the frozen worker held no jobs"
    assert waited < 5 * 3, "not back within a few heartbeats"
