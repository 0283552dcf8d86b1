"""The worker process: loads its models, serves jobs, reports status, stops gracefully.

A worker whose inference does not return within `HOTSWAP_INFERENCE_TIMEOUT_S` (a stuck GPU call,
a deadlock) is hung: it stops taking jobs, says why on /readyz and /status, closes its broker
connection so that the broker redelivers its unacked jobs at once, and exits with `EXIT_HUNG`
(the stuck thread cannot be stopped; a supervisor starts a fresh process).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from aio_pika.abc import AbstractRobustConnection

from schemas.signing import Signer, Verifier
from schemas.status import WorkerStatus
from worker.admission import PixelBudget
from worker.batching import MicroBatcher
from worker.config import WorkerSettings
from worker.connections import connect
from worker.consumer import JobConsumer
from worker.control import ControlLoop
from worker.cpus import pin_current_thread, plan_cpus
from worker.evidence import Evidence
from worker.fetch import UrlPolicy, image_session
from worker.jobs import JobProcessor
from worker.metrics import WorkerMetrics
from worker.peers import FleetArtifacts, advertised_url
from worker.runtime.artifacts import ArtifactCache
from worker.runtime.images import ImageLimits
from worker.runtime.lifecycle import ModelVersion
from worker.runtime.load_slots import LoadSlots
from worker.runtime.manager import ModelManager, ModelSpec
from worker.runtime.memory import keep_freed_memory
from worker.runtime.profiling import STEPS
from worker.runtime.repository import ModelRepository
from worker.runtime.sources import SourcePolicy
from worker.runtime.validation import LatencyBudget
from worker.runtime.weights import ArtifactLoader
from worker.status import StatusServer
from worker.threads import LoopThreads

log = logging.getLogger(__name__)

#: Exit status of a worker that gave up on a hung inference (EX_SOFTWARE).
EXIT_HUNG = 70


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        if not settings.models:
            raise ValueError("a worker needs at least one model (--model NAME[@VERSION])")
        self.settings = settings
        self.specs = [ModelSpec.parse(text) for text in settings.models]
        self.metrics = WorkerMetrics()
        self.metrics.expect_models(spec.model for spec in self.specs)
        self.started_at = time.time()
        if settings.profile:
            STEPS.enabled = True  # process-wide: the backends' steps are timed too
        # Raises before anything starts when the CPUs asked for are not this process's to use.
        self.cpus = plan_cpus(settings.inference_cpus)
        # One inference thread: torch parallelises inside it (settings.torch_threads), in threads
        # it starts, which inherit its CPUs.
        self.inference_thread = LoopThreads(
            1, "inference", initializer=partial(pin_current_thread, self.cpus.inference) if self.cpus else None
        )
        self.decode_threads = LoopThreads(settings.decode_threads, "decode")
        # Loading and validating a new version must not queue behind (or take cores from) serving:
        # its thread runs at a lower CPU priority, so an update uses what serving leaves idle.
        self.control_executor = ThreadPoolExecutor(
            1, thread_name_prefix="control", initializer=lower_thread_priority, initargs=(settings.control_nice,)
        )
        self.models = ModelManager(
            ModelRepository(settings.model_root), settings.device, self.control_executor,
            LatencyBudget(factor=settings.latency_budget_factor, cpu_time=settings.device == "cpu"), self.metrics,
            ArtifactCache(settings.artifact_cache, SourcePolicy(settings.artifact_sources)),
            ArtifactLoader(allow_pickle=settings.allow_pickle),
            LoadSlots(settings.load_slot_dir, settings.load_slots, settings.load_slot_wait_s),
        )
        self.limits = ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout_s=settings.image_fetch_timeout_s,
            read_timeout_s=settings.image_read_timeout_s,
            file_roots=tuple(settings.image_file_roots),
        )
        # Parsed here, so that a bad host pattern stops the worker before it serves.
        self.url_policy = UrlPolicy.of(settings.image_url_hosts, settings.image_url_networks)
        self.connection: AbstractRobustConnection | None = None
        self.consumer: JobConsumer | None = None
        self.processor: JobProcessor | None = None
        self.control: ControlLoop | None = None
        self.broker_connected = False
        self.stopping = asyncio.Event()
        self.evidence = Evidence()  # what each version answered: in heartbeats, for rollouts
        #: Why this worker gave up (a hung inference); the process should exit with EXIT_HUNG.
        self.hung: str | None = None
        self.status_url = ""
        #: Artifacts from and to the fleet's peers (worker.peers); None without the control plane.
        self.fleet: FleetArtifacts | None = None

    async def run(self, *, handle_signals: bool = True) -> None:
        if self.cpus is not None:  # before any thread starts: each inherits them (worker.cpus)
            pin_current_thread(self.cpus.others)
            log.info("%s", self.cpus.describe())
        _limit_torch_threads(self.settings.torch_threads)
        keep_freed_memory(self.settings.allocator_keep_mib * 2**20)
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        keys = self._control_keys()
        cache = self.models.artifacts
        if keys is not None and cache is not None and self.settings.peer_artifacts:
            self.fleet = FleetArtifacts.of(self.settings, keys[1], cache)
        status = StatusServer(self, self.settings.status_host, self.settings.status_port,
                              self.fleet.server if self.fleet else None)
        self.status_url = await status.start()
        http = image_session(self.url_policy)  # only where the policy allows
        self.connection = await connect(self.settings.amqp_url, f"hotswap-worker {self.settings.worker_id}",
                                        heartbeat_s=self.settings.amqp_heartbeat_s)
        self.connection.close_callbacks.add(lambda *_: self._set_connected(False))
        self.connection.reconnect_callbacks.add(lambda *_: self._set_connected(True))
        self._set_connected(True)
        watchdog: asyncio.Task[None] | None = None
        try:
            await self._load_models(self.connection, keys)
            batcher = MicroBatcher(self.inference_thread, self.settings.max_batch, self.settings.max_wait_ms,
                                   self.metrics, on_batch=self._batch_ran)
            self.processor = JobProcessor(
                self.settings.worker_id, self.models.table, self.limits, self.decode_threads, batcher,
                PixelBudget(self.settings.max_pixels_in_flight), http, self.metrics,
                max_shadows=self.settings.max_shadow_in_flight, evidence=self.evidence,
            )
            watchdog = asyncio.create_task(self._watch_inference(batcher))
            await self._serve(self.connection, self.processor)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self.fleet is not None:
                self.fleet.client.close()  # a control thread waiting for peers gives up
            if self.control is not None:
                await self.control.stop()
            await self.connection.close()
            self._set_connected(False)
            await http.close()
            await status.stop()
            self.inference_thread.shutdown()
            self.decode_threads.shutdown()
            self.control_executor.shutdown(wait=False, cancel_futures=True)

    def _control_keys(self) -> tuple[Verifier, Signer] | None:
        """The keys of the control plane (commands in, status events out), None when it is off;
        read before anything starts, so that a missing worker key stops the worker at once."""
        if self.settings.control_public_key is None:
            return None
        path = self.settings.worker_key_path
        if path is None or not path.is_file():
            raise WorkerKeyMissing(
                f"no worker key at {path}: the control plane needs one to sign status events "
                "(`hotswap keys generate` writes worker.key beside control.pub; or HOTSWAP_WORKER_KEY)"
            )
        return Verifier.from_file(self.settings.control_public_key), Signer.from_file(path)

    async def _load_models(self, connection: AbstractRobustConnection, keys: tuple[Verifier, Signer] | None) -> None:
        """With a control key: what the control log says (replayed). Without: what --model says."""
        if keys is None:
            log.warning("no HOTSWAP_CONTROL_PUBLIC_KEY: control plane off, serving --model versions only")
            await self.models.start(self.specs)
            return
        verifier, signer = keys
        initial = {s.model: s.version or self.models.repository.latest(s.model) for s in self.specs}
        self.control = ControlLoop(
            worker_id=self.settings.worker_id, topology=self.settings.topology, manager=self.models,
            verifier=verifier, signer=signer, metrics=self.metrics, initial=initial,
            keep_standby=self.settings.keep_standby, heartbeat_interval_s=self.settings.heartbeat_interval_s,
            peer_url=advertised_url(self.status_url, self.settings.peer_url) if self.fleet else None,
            peers=self.fleet.listener if self.fleet else None, evidence=self.evidence,
        )
        await self.control.start(connection)

    async def _serve(self, connection: AbstractRobustConnection, processor: JobProcessor) -> None:
        self.consumer = JobConsumer(self.settings, processor, self.metrics)
        await self.consumer.start(connection, [spec.model for spec in self.specs])
        log.info("worker %s ready", self.settings.worker_id)
        await self.stopping.wait()
        await self._shut_down(self.consumer)

    def _batch_ran(self, version: ModelVersion, size: int, ms: float) -> None:
        self.evidence.batch_ran(version.model, version.version, size, ms)
        self.metrics.version_inference_of(version.model, version.version).observe(ms / 1000)

    def _set_connected(self, connected: bool) -> None:
        # A robust connection never reports itself closed while it reconnects: track it here.
        if connected != self.broker_connected:
            log.log(logging.INFO if connected else logging.WARNING,
                    "broker connection %s", "up" if connected else "lost; reconnecting")
        self.broker_connected = connected
        self.metrics.broker_connected.set(int(connected))

    async def _watch_inference(self, batcher: MicroBatcher) -> None:
        bound = self.settings.inference_timeout_s
        while not self.stopping.is_set():
            await asyncio.sleep(min(1.0, bound / 4))
            stuck = batcher.running_for()
            if stuck > bound:
                self.hung = (f"hung: an inference batch has not returned for {stuck:.1f} s "
                             f"(HOTSWAP_INFERENCE_TIMEOUT_S is {bound:g})")
                log.critical("%s; giving its jobs back and exiting", self.hung)
                self.stopping.set()

    async def _shut_down(self, consumer: JobConsumer) -> None:
        log.info("stopping: no new jobs; %d in flight", consumer.in_flight)
        if self.hung is not None:
            # Its jobs will never finish here: the broker redelivers them once the connection is gone.
            await consumer.stop_consuming()
            if self.connection is not None:
                await self.connection.close()
            await asyncio.sleep(self.settings.hung_exit_delay_s)  # /readyz says why meanwhile
            return
        if await consumer.stop(self.settings.grace_period_s):
            log.info("all in-flight jobs answered")
        else:
            log.warning(
                "grace period over with %d jobs in flight; the broker will redeliver them",
                consumer.in_flight,
            )

    # --- what the status server shows -------------------------------------------------------

    def not_ready_reasons(self) -> list[str]:
        reasons = [self.hung] if self.hung else []
        if not self.broker_connected:
            reasons.append("not connected to the broker")
        if not self.models.table.all():
            reasons.append("no model loaded")
        if self.consumer is None or not self.consumer.consuming:
            reasons.append("not consuming")
        if self.stopping.is_set():
            reasons.append("shutting down")
        return reasons

    def status(self) -> WorkerStatus:
        stats = self.processor.stats if self.processor else None
        return WorkerStatus(
            worker_id=self.settings.worker_id, host=socket.gethostname(), pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 3), ready=not self.not_ready_reasons(), hung=self.hung,
            broker_connected=self.broker_connected, in_flight=self.consumer.in_flight if self.consumer else 0,
            jobs_done=stats.done if stats else 0, jobs_failed=stats.failed if stats else 0,
            last_error=stats.last_error if stats else None,
            models={d.model: d.status() for d in self.models.table.all()},
            control=self.control.status() if self.control else None,
        )

    def refresh_metrics(self) -> None:
        self.metrics.observe_ready(self.not_ready_reasons())
        if self.processor is not None:
            self.metrics.observe_pixels(self.processor.pixels.held, self.processor.pixels.waiting)
        self.metrics.observe_deployments({d.model: d.status() for d in self.models.table.all()})


class WorkerKeyMissing(Exception):
    """The control plane is on but the key that signs status events is not there."""


def lower_thread_priority(nice: int) -> None:
    """Give the calling thread this niceness (Linux applies it per thread, not per process)."""
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:  # not allowed here: the thread keeps the process's priority
            log.warning("could not lower the control thread's priority: %s", exc)


def _limit_torch_threads(threads: int) -> None:
    # Two torch threads under contention ran 20× slower on a 2-core machine (docs/architecture.md, "Targets").
    import torch

    torch.set_num_threads(threads)
