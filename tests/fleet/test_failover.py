"""A fleet on a 3-node RabbitMQ cluster (control/cluster.py, started once for the module): the
replicated entities live where they are asked to, and under load a node killed with SIGKILL (the
one leading the job queue, or the one a worker is connected to), a rolling restart with an update
between, and a worker started while a node is down lose no job and leave the fleet agreeing.

Each kill prints the throughput dip and the time to recover (`-s` shows them). Not tested, since
it fails on 3.10.8 in some runs (README, "A cluster"): killing the node a producer is connected to
while its reply queue is led from there.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import pytest
from fleet_load import Load, measure_dip

from control.client import Client
from control.cluster import LocalCluster, Node
from control.operator import Operator
from schemas.control import Update
from schemas.jobs import JobResult
from schemas.signing import KeyFiles, Signer, Verifier
from schemas.topology import Topology
from worker.connections import connect
from worker.declarer import Declarer, TopologyMismatch
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import HeldOut, StartWorker

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPLICAS = 3
MODEL = "trivial"


def _ports_free(first: int, count: int) -> bool:
    for port in [*range(first, first + count), *range(first + 20000, first + 20000 + count)]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    first = next(p for p in range(5701, 5901, 10) if _ports_free(p, REPLICAS))
    # Not under pytest's tmp_path: its parents are root's alone, and the nodes run as the broker user.
    nodes = LocalCluster(Path(tempfile.mkdtemp(prefix="hotswap-cluster-")), REPLICAS, first)
    started = time.monotonic()
    try:
        nodes.start()
        print(f"\n{REPLICAS}-node cluster up and clustered in {time.monotonic() - started:.1f} s")
        yield nodes
    finally:
        nodes.stop()
    assert not nodes.base.exists()


@pytest.fixture(scope="module")
def amqp_url(cluster: LocalCluster) -> str:
    """The shared fixtures (`start_worker`, `client`) on the cluster, never the main broker."""
    return cluster.urls()


@pytest.fixture
def namespace() -> str:
    """Of this test alone; nothing to delete: the cluster goes with the module."""
    return f"fleet-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def whole(cluster: LocalCluster) -> LocalCluster:
    """The cluster with every node running (a test before may have killed one)."""
    for node in cluster.nodes:
        if not cluster._alive(node):
            cluster.start_node(node)
    cluster.await_clustered()
    return cluster


@pytest.fixture
async def fleet_client(whole: LocalCluster, namespace: str) -> AsyncIterator[Client]:
    """A client given every node, first the first: it starts on node 1."""
    async with Client(whole.urls(), namespace=namespace, replicas=REPLICAS, timeout_s=90) as client:
        yield client


def _serve(start_worker: StartWorker, cluster: LocalCluster, name: str, *order: int) -> None:
    """A worker given every node, in `order`: it connects to the first."""
    start_worker(f"{MODEL}@1.0.0", name=name, env={
        "HOTSWAP_AMQP_URL": cluster.urls(*order), "HOTSWAP_QUEUE_REPLICAS": str(REPLICAS),
    })


def _accounting(client: Client, results: list[JobResult]) -> str:
    return (f"{client.duplicates} duplicate results dropped, {client.republished} publishes retried across "
            f"a reconnect, {client.nacked} nacked and retried, {sum(r.attempt > 1 for r in results)} jobs redelivered")


def _connected_to(cluster: LocalCluster, connection_name: str) -> Node:
    ports = [port for name, port in cluster.connections() if name == connection_name]
    assert len(ports) == 1, (connection_name, cluster.connections())
    return next(n for n in cluster.nodes if n.amqp_port == ports[0])


async def test_job_queues_and_the_control_log_are_declared_with_their_replicas(
    whole: LocalCluster, namespace: str
) -> None:
    """Two replicas asked of three nodes: the broker's defaults (3 for quorum queues, every node
    for streams) would give three, so two means the arguments reached it. A declaration without
    them is refused for the same queue: every process of a namespace must agree."""
    topology = Topology(namespace, replicas=2)
    connection = await connect(whole.urls(), "replica-test", attempts=1)
    async with connection:
        declarer = Declarer(await connection.channel(), topology)
        await declarer.job_queue(MODEL, delivery_limit=3)
        await declarer.control()
        await declarer.reply_queue(f"{namespace}.reply.guest.test", expires_s=60)
        names = [topology.job_queue(MODEL), topology.dead_letter_queue(MODEL), topology.control_log,
                 f"{namespace}.reply.guest.test"]
        for name in names:
            assert len(whole.members(name)) == 2, (name, whole.members(name))
        unreplicated = Declarer(await connection.channel(), Topology(namespace))
        with pytest.raises(TopologyMismatch, match="x-quorum-initial-group-size"):
            await unreplicated.job_queue(MODEL, delivery_limit=3)


async def test_killing_the_job_queue_leader_loses_no_job(
    whole: LocalCluster, namespace: str, start_worker: StartWorker, heldout: list[HeldOut], model_root: Path,
) -> None:
    """The job queue led by node 1 (declared there), the workers on nodes 2 and 3, the client on
    node 2: kill -9 the leader alone. The queue elects a new leader from its replicas; publishes
    in flight are confirmed by it; no connection here needs to move."""
    write_trivial_model(model_root, "1.0.0", whole_image=True)
    topology = Topology(namespace, replicas=REPLICAS)
    async with await aio_pika.connect(whole.nodes[0].url) as first:
        await Declarer(await first.channel(), topology).job_queue(MODEL, delivery_limit=3)
    leader = whole.leader(topology.job_queue(MODEL))
    others = [i for i, n in enumerate(whole.nodes) if n != leader]
    _serve(start_worker, whole, "w1", others[0], others[1])
    _serve(start_worker, whole, "w2", others[1], others[0])
    async with Client(whole.urls(*others), namespace=namespace, replicas=REPLICAS, timeout_s=90) as client:
        load = Load(client, [h.path for h in heldout], jobs=600)
        running = asyncio.create_task(load.run())
        await load.wait_for(150)
        killed_at = time.monotonic()
        await asyncio.to_thread(whole.kill, leader)
        await running
        results = load.assert_every_job_answered_once()
    new_leader = whole.leader(topology.job_queue(MODEL))
    assert new_leader != leader
    assert {r.worker_id for r in load.answered_after(killed_at)} == {"w1", "w2"}
    dip = measure_dip([t for t, _ in load.answered], killed_at)
    print(f"\n{dip.line(f'leader {leader.short} killed, {new_leader.short} leads')}; {_accounting(client, results)}")


async def test_killing_the_node_a_worker_is_connected_to_loses_no_job(
    whole: LocalCluster, namespace: str, start_worker: StartWorker, heldout: list[HeldOut], model_root: Path,
) -> None:
    """Worker w1 on node 1 (first in its list; the job queue, which it declares, is led from there
    too), w2 and the client on node 2: kill -9 node 1. w1's unacked jobs go back to the queue, the
    queue elects a new leader, and w1 fails over to the next node, restores its consumers there and
    carries on."""
    write_trivial_model(model_root, "1.0.0", whole_image=True)
    _serve(start_worker, whole, "w1", 0, 1, 2)
    _serve(start_worker, whole, "w2", 1, 2, 0)
    victim = _connected_to(whole, "hotswap-worker w1")
    assert victim == whole.nodes[0]
    async with Client(whole.urls(1, 2, 0), namespace=namespace, replicas=REPLICAS, timeout_s=90) as client:
        # Load until w1 answers from its new node, not a fixed count: w2 alone may finish a few
        # hundred jobs before w1's reconnect, queue re-declaration and consumer restore are done.
        load = Load(client, [h.path for h in heldout], jobs=10**6)
        running = asyncio.create_task(load.run())
        await load.wait_for(150)
        killed_at = time.monotonic()
        await asyncio.to_thread(whole.kill, victim)
        await load.wait_until(lambda: load.first_answer_by("w1", killed_at + 0.5) is not None,
                              "answer from w1 after the kill")
        await asyncio.sleep(2.0)  # load beyond the recovery, for the dip's 1-s windows
        load.stop()
        await running
        results = load.assert_every_job_answered_once()
    after = {r.worker_id for r in load.answered_after(killed_at + 0.5)}
    assert after == {"w1", "w2"}, f"answering after the kill: {after}"
    assert _connected_to(whole, "hotswap-worker w1") != victim
    dip = measure_dip([t for t, _ in load.answered], killed_at)
    # Answers w1 sent before the kill may still arrive in its first moments: counted from 0.5 s on.
    back = (load.first_answer_by("w1", killed_at + 0.5) or killed_at) - killed_at
    print(f"\n{dip.line(f'node {victim.short} (w1 and the queue leader) killed')}; w1 answering again "
          f"{back:.2f} s after; {_accounting(client, results)}")


async def test_a_worker_started_while_a_node_is_down_converges_to_the_fleets_state(
    whole: LocalCluster, namespace: str, start_worker: StartWorker, fleet_client: Client,
    heldout: list[HeldOut], model_root: Path, control_keys: KeyFiles,
) -> None:
    """Node 3 down: an update published through a list that names it first reaches the running
    worker; a worker started now, node 3 first in its list too, replays the control log from the
    surviving replicas and serves the same version."""
    for version in ("1.0.0", "2.0.0"):
        write_trivial_model(model_root, version, whole_image=True)
    _serve(start_worker, whole, "w1", 0, 1, 2)
    down = whole.nodes[2]
    await asyncio.to_thread(whole.kill, down)
    async with Operator(whole.urls(2, 0, 1), namespace=namespace, signer=Signer.from_file(control_keys.control_key),
                        workers=Verifier.from_file(control_keys.worker_public), replicas=REPLICAS) as operator:
        report = await operator.publish_and_wait(MODEL, Update(version="2.0.0"), timeout_s=60)
    assert report.ok and report.workers == ["w1"], (report.missing, report.failures)
    _serve(start_worker, whole, "w2", 2, 1, 0)
    load = Load(fleet_client, [h.path for h in heldout], jobs=200)
    await load.run()
    results = load.assert_every_job_answered_once()
    assert {r.version for r in results} == {"2.0.0"}
    assert {r.worker_id for r in results} == {"w1", "w2"}


async def test_a_rolling_restart_with_an_update_between_loses_no_job(
    whole: LocalCluster, namespace: str, start_worker: StartWorker, fleet_client: Client,
    heldout: list[HeldOut], model_root: Path, control_keys: KeyFiles,
) -> None:
    """Each node stopped and started again in turn, under load, and the fleet updated after the
    first: the workers and the client move along their lists node by node, and every job is
    answered, by 2.0.0 once the update is done."""
    for version in ("1.0.0", "2.0.0"):
        write_trivial_model(model_root, version, whole_image=True)
    _serve(start_worker, whole, "w1", 0, 1, 2)
    _serve(start_worker, whole, "w2", 1, 2, 0)
    load = Load(fleet_client, [h.path for h in heldout], jobs=10**6, concurrency=8)
    running = asyncio.create_task(load.run())
    await load.wait_for(50)
    updated_at = float("inf")
    async with Operator(whole.urls(2, 0, 1), namespace=namespace, signer=Signer.from_file(control_keys.control_key),
                        workers=Verifier.from_file(control_keys.worker_public), replicas=REPLICAS) as operator:
        for node in whole.nodes:
            await asyncio.to_thread(whole.stop_node, node)
            await asyncio.to_thread(whole.start_node, node)
            await asyncio.to_thread(whole.await_clustered)
            if updated_at == float("inf"):
                report = await operator.publish_and_wait(MODEL, Update(version="2.0.0"), timeout_s=60)
                assert report.ok and report.workers == ["w1", "w2"], (report.missing, report.failures)
                updated_at = time.monotonic()
    load.stop()
    await running
    results = load.assert_every_job_answered_once()
    assert {r.version for at, r in load.answered if at > updated_at + 2} == {"2.0.0"}
    print(f"\nrolling restart: {len(load.answered)} jobs; {_accounting(fleet_client, results)}")
