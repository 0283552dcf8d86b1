"""Artifacts for a fleet: workers fetch an update's artifact from each other before its source,
only the first few go to the source, only the fleet is served, and a peer cannot lie.

Workers run in the test's event loop (`serve_in_process`), each with a cache of its own as on a
machine of its own: the peer path is HTTP between their status servers and AMQP heartbeats, as
between processes. The source is an aiohttp server in the test that shares a fixed bandwidth
among its connections (a store's uplink), so that a storm costs what it costs there. The
artifacts are trivial models padded to ~60 KB (the trivial backend reads at most 64 KiB), and
the bandwidth is scaled down to match.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import aiohttp
import pytest
from aiohttp import web

from control.operator import Operator, WaitReport
from schemas.control import ArtifactRef, ArtifactRequest, Heartbeat, ModelStatus, Progress, Update
from schemas.signing import KeyFiles, Signer, generate_keys
from schemas.topology import HEARTBEAT_TYPE, Topology
from worker.peers import FleetArtifacts
from worker.runtime.peers import AUTH_SCHEME, rank_key, signed_request
from worker.runtime.repository import sha256_of
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import InProcessWorker, ServeInProcess

pytestmark = pytest.mark.slow

ARTIFACT = "model.json"


def publish(root: Path, version: str) -> str:
    """A trivial version under `root` whose artifact is padded to ~60 KB of random text; its sha256."""
    directory = write_trivial_model(root, version, whole_image=True)
    padded = {"kind": "trivial", "whole_image": True, "padding": secrets.token_hex(30_000)}
    (directory / ARTIFACT).write_text(json.dumps(padded))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["sha256"] = sha256_of(directory / ARTIFACT)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(manifest["sha256"])


class Source:
    """An artifact store with `rate` bytes/s in all, shared by every connection; counts what it sends."""

    def __init__(self, root: Path, rate: float) -> None:
        self.root = root
        self.rate = rate
        self.requests: Counter[str] = Counter()  # by path below the root
        self.sent: Counter[str] = Counter()  # bytes, by path
        self._uplink = asyncio.Lock()  # chunks queue for the one uplink, whoever sends them
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        path = self.root / relative
        if ".." in relative.split("/") or not path.is_file():
            raise web.HTTPNotFound()
        self.requests[relative] += 1
        body = path.read_bytes()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(body)
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            chunk = body[start:start + 4096]
            async with self._uplink:
                await asyncio.sleep(len(chunk) / self.rate)
            await response.write(chunk)
            self.sent[relative] += len(chunk)
        return response


@asynccontextmanager
async def source_at(root: Path, rate: float) -> AsyncIterator[Source]:
    source = Source(root, rate)
    app = web.Application()
    app.router.add_get("/models/{path:.+}", source.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    source.url = f"http://127.0.0.1:{runner.addresses[0][1]}/models"
    try:
        yield source
    finally:
        await runner.cleanup()


def update_to(source: Source, version: str, sha: str) -> Update:
    return Update(version=version, artifact=ArtifactRef(uri=f"{source.url}/trivial/{version}/{ARTIFACT}", sha256=sha))


def seconds_taken(report: WaitReport) -> float:
    """From the first worker receiving the command to the last one done, by the workers' own clocks."""
    events = [p for worker in report.workers for p in report.progress[worker]]
    return (max(p.at for p in events) - min(p.at for p in events)).total_seconds()


def slowest_fetch(report: WaitReport) -> float:
    """The longest preload (fetching the artifact, most of it) of any worker."""
    def preload(events: list[Progress]) -> float:
        at = {p.phase: p.at for p in events}
        return (at["validate"] - at["preload"]).total_seconds()

    return max(preload(report.progress[worker]) for worker in report.workers)


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), what


def fleet_of(worker: InProcessWorker) -> FleetArtifacts:
    assert worker.fleet is not None, "peer artifacts are on with the control plane"
    return worker.fleet


async def test_a_fleet_fetches_an_artifact_from_its_source_at_most_twice_and_sooner(
    serve_in_process: ServeInProcess, operator: Operator, tmp_path: Path
) -> None:
    published = tmp_path / "published"
    alone, together = publish(published, "3.0.0"), publish(published, "4.0.0")
    async with source_at(published, rate=40_000) as source:
        workers = [
            # No standby: each update frees the version before, so that both runs do the same work.
            await serve_in_process(name=f"w{i}", artifact_sources=[f"{source.url}/"],
                                   artifact_cache=tmp_path / f"cache-{i}", peer_source_concurrency=2, keep_standby=0)
            for i in range(6)
        ]
        # Every worker knows the five others serve the model: they agree on who goes to the source.
        await until(lambda: all({p.worker_id for p in fleet_of(w).table.live() if "trivial" in p.models} ==
                                {v.settings.worker_id for v in workers} - {w.settings.worker_id} for w in workers),
                    15, "every worker hears every other's heartbeats")

        for worker in workers:  # the same fleet, every worker to the source: the storm
            fleet_of(worker).client.enabled = False
        storm = await operator.publish_and_wait("trivial", update_to(source, "3.0.0", alone), settle_s=0.6)
        for worker in workers:
            fleet_of(worker).client.enabled = True
        shared = await operator.publish_and_wait("trivial", update_to(source, "4.0.0", together), settle_s=0.6)

    for report in (storm, shared):
        assert set(report.workers) == {f"w{i}" for i in range(6)}, report.workers
        assert report.ok, (report.missing, report.failures)
    size = (published / "trivial" / "4.0.0" / ARTIFACT).stat().st_size
    print(f"\nevery worker to the source: update {seconds_taken(storm):.2f} s (slowest fetch "
          f"{slowest_fetch(storm):.2f} s), {source.requests[f'trivial/3.0.0/{ARTIFACT}']} artifact requests; "
          f"peers first: update {seconds_taken(shared):.2f} s (slowest fetch {slowest_fetch(shared):.2f} s), "
          f"{source.requests[f'trivial/4.0.0/{ARTIFACT}']} artifact requests ({size} bytes each)")
    assert source.requests[f"trivial/3.0.0/{ARTIFACT}"] == 6
    assert 1 <= source.requests[f"trivial/4.0.0/{ARTIFACT}"] <= 2, source.requests
    assert source.sent[f"trivial/4.0.0/{ARTIFACT}"] <= 2 * size
    assert seconds_taken(shared) < seconds_taken(storm)
    for i, worker in enumerate(workers):  # each holds the verified bytes and serves them on
        blob = tmp_path / f"cache-{i}" / ".sha256" / together
        assert blob.is_file() and sha256_of(blob) == together, worker.settings.worker_id
        assert fleet_of(worker).client.failures == []


async def test_a_peer_serves_only_signed_fresh_requests_for_what_it_holds(
    serve_in_process: ServeInProcess, operator: Operator, control_keys: KeyFiles, tmp_path: Path
) -> None:
    published = tmp_path / "published"
    sha = publish(published, "3.0.0")
    async with source_at(published, rate=10_000_000) as source:
        worker = await serve_in_process(name="a", artifact_sources=[f"{source.url}/"], artifact_cache=tmp_path / "c")
        report = await operator.publish_and_wait("trivial", update_to(source, "3.0.0", sha), settle_s=0.6)
    assert report.ok, report.failures
    fleet = Signer.from_file(control_keys.worker_key)
    outsider = Signer.from_file(generate_keys(tmp_path / "outsider").worker_key)

    def envelope(request: ArtifactRequest, signer: Signer = fleet) -> str:
        return f"{AUTH_SCHEME} " + base64.urlsafe_b64encode(
            signer.sign_text(request.model_dump_json()).model_dump_json().encode()).decode()

    now = datetime.now(UTC)
    other = hashlib.sha256(b"another artifact").hexdigest()
    refused = [
        ("unsigned", None),
        ("unsigned", "Bearer anything"),
        ("unsigned", f"{AUTH_SCHEME} not-an-envelope"),
        ("bad signature", signed_request(outsider, "intruder", "a", sha)),
        ("mismatch", signed_request(fleet, "b", "a", other)),  # signed for another artifact
        ("mismatch", signed_request(fleet, "b", "another-peer", sha)),  # signed for another peer
        ("stale", envelope(ArtifactRequest(worker_id="b", to="a", sha256=sha, at=now - timedelta(seconds=120)))),
    ]
    async with aiohttp.ClientSession() as http:
        async def get(sha256: str, authorization: str | None) -> tuple[int, bytes]:
            headers = {"Authorization": authorization} if authorization else {}
            async with http.get(f"{worker.url}/artifacts/{sha256}", headers=headers) as response:
                return response.status, await response.read()

        for kind, authorization in refused:
            status, body = await get(sha, authorization)
            assert status == 403, (kind, status)
            said = json.loads(body)
            assert said["refused"] == kind and said["reason"], said
        status, body = await get(sha, signed_request(fleet, "b", "a", sha))
        assert status == 200 and hashlib.sha256(body).hexdigest() == sha
        assert (await get(other, signed_request(fleet, "b", "a", other)))[0] == 404
    assert fleet_of(worker).server.refused == {"unsigned": 3, "bad signature": 1, "mismatch": 2, "stale": 1}


class FakePeers:
    """Peers that are not: a server answering every artifact request with wrong bytes, and signed
    (or forged) heartbeats claiming it holds what the test says."""

    def __init__(self, namespace: str, amqp_url: str) -> None:
        self.topology = Topology(namespace)
        self.amqp_url = amqp_url
        self.asked: Counter[str] = Counter()  # by peer name
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def lie(request: web.Request) -> web.Response:
            self.asked[request.match_info["peer"]] += 1
            return web.Response(body=b'{"kind": "trivial", "whole_image": false}')

        app = web.Application()
        app.router.add_get("/{peer}/artifacts/{sha256}", lie)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def beat(self, bodies: Callable[[], list[tuple[str, bytes]]], stop: asyncio.Event) -> None:
        """Publish (routing name, body) heartbeats every 0.3 s until `stop`."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            status = await channel.get_exchange(self.topology.status_exchange)
            while not stop.is_set():
                for name, body in bodies():
                    await status.publish(aio_pika.Message(body, type=HEARTBEAT_TYPE),
                                         routing_key=self.topology.heartbeat_key(name))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.3)


@pytest.fixture
async def fakes(namespace: str, amqp_url: str) -> AsyncIterator[FakePeers]:
    peers = FakePeers(namespace, amqp_url)
    await peers.start()
    yield peers
    await peers.stop()


def heartbeat(name: str, url: str | None, *, holds: Sequence[str] = (), fetching: Sequence[str] = (),
              models: Sequence[str] = ()) -> Heartbeat:
    return Heartbeat(worker_id=name, at=datetime.now(UTC), peer_url=url, artifacts=list(holds),
                     fetching=list(fetching),
                     models={m: ModelStatus(active="1.0.0", versions={}) for m in models})


async def test_a_peer_sending_wrong_bytes_is_skipped_and_only_signed_heartbeats_are_believed(
    serve_in_process: ServeInProcess, operator: Operator, control_keys: KeyFiles, fakes: FakePeers, tmp_path: Path
) -> None:
    published = tmp_path / "published"
    sha = publish(published, "3.0.0")
    fleet = Signer.from_file(control_keys.worker_key)
    outsider = Signer.from_file(generate_keys(tmp_path / "outsider").worker_key)

    def bodies() -> list[tuple[str, bytes]]:
        # No models named: the operator does not wait for them (they hold artifacts only).
        return [
            ("liar", fleet.sign_event(heartbeat("liar", f"{fakes.url}/liar", holds=[sha]))),
            ("forger", heartbeat("forger", f"{fakes.url}/forger", holds=[sha]).model_dump_json().encode()),
            ("outsider", outsider.sign_event(heartbeat("outsider", f"{fakes.url}/outsider", holds=[sha]))),
        ]

    stop = asyncio.Event()
    beating = asyncio.create_task(fakes.beat(bodies, stop))
    try:
        async with source_at(published, rate=10_000_000) as source:
            worker = await serve_in_process(name="honest", artifact_sources=[f"{source.url}/"],
                                            artifact_cache=tmp_path / "c")
            table = fleet_of(worker).table
            await until(lambda: any(p.worker_id == "liar" for p in table.live()), 10, "the liar's heartbeat is heard")
            report = await operator.publish_and_wait("trivial", update_to(source, "3.0.0", sha), settle_s=0.6)
    finally:
        stop.set()
        await beating
    final = report.final("honest")
    assert final is not None and final.phase == "done", final
    assert {p.worker_id for p in table.live()} == {"liar"}  # never the unsigned one nor the outsider
    assert fakes.asked == {"liar": 1}, fakes.asked
    assert source.requests[f"trivial/3.0.0/{ARTIFACT}"] == 1  # after the liar, the source
    assert [peer for peer, _, why in fleet_of(worker).client.failures if "sha256" in why] == ["liar"]
    assert sha256_of(tmp_path / "c" / ".sha256" / sha) == sha
    assert fleet_of(worker).listener.rejected >= 2  # the forged and the outsider's


async def test_a_worker_waiting_for_a_peer_that_gives_up_goes_to_the_source_itself(
    serve_in_process: ServeInProcess, operator: Operator, control_keys: KeyFiles, fakes: FakePeers, tmp_path: Path
) -> None:
    """A worker ranked after another waits while that one announces it is fetching; once it stops
    (its fetch failed: it lives on, holding nothing), the waiter fetches from the source after its
    patience: the update is late, never stuck. (A peer that dies drops out of the ranking with its
    heartbeats, sooner still.)"""
    published = tmp_path / "published"
    sha = publish(published, "3.0.0")
    fleet = Signer.from_file(control_keys.worker_key)
    # A fleet member ranked first for this artifact: it, not "waiter", goes to the source.
    first = next(name for name in (f"first{i}" for i in range(1000)) if rank_key(name, sha) < rank_key("waiter", sha))
    gave_up = asyncio.Event()

    def bodies() -> list[tuple[str, bytes]]:
        fetching = [] if gave_up.is_set() else [sha]
        return [(first, fleet.sign_event(heartbeat(first, None, fetching=fetching, models=("trivial",))))]

    stop = asyncio.Event()
    beating = asyncio.create_task(fakes.beat(bodies, stop))
    try:
        async with source_at(published, rate=10_000_000) as source:
            worker = await serve_in_process(name="waiter", artifact_sources=[f"{source.url}/"],
                                            artifact_cache=tmp_path / "c", peer_source_concurrency=1, peer_wait_s=60)
            table = fleet_of(worker).table
            await until(lambda: any(p.worker_id == first for p in table.live()), 10, "the first one is heard")
            command = await operator.publish("trivial", update_to(source, "3.0.0", sha))
            await asyncio.sleep(4)  # longer than the worker's patience (3 heartbeats, twice): it still waits
            assert source.requests[f"trivial/3.0.0/{ARTIFACT}"] == 0
            gave_up.set()
            since = time.monotonic()
            await until(lambda: worker.control is not None and worker.control.applied_seq["trivial"] >= command.seq,
                        30, "the update completes")
            waited = time.monotonic() - since
    finally:
        stop.set()
        await beating
    assert worker.models.table.get("trivial").active.version == "3.0.0"  # type: ignore[union-attr]
    assert source.requests[f"trivial/3.0.0/{ARTIFACT}"] == 1
    assert {p.worker_id for p in table.live()} == {first}  # it lived on: the patience, not its absence, decided
    print(f"\nthe waiter went to the source {waited:.2f} s after the first one stopped fetching")
    assert waited < 15  # its patience, not the 60 s it would wait at most
