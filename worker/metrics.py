"""Prometheus metrics of one worker process, in a registry of its own."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.errors import MALFORMED, ErrorCode
from schemas.status import DeploymentStatus
from worker.runtime.on_demand import EVICTION_REASONS, LOAD_OUTCOMES

#: Label values known before anything happens, so their series exist at 0 from the first scrape:
#: Prometheus's increase() and rate() see nothing of a counter's first appearance (a series born at
#: 1 has no earlier sample), so a first failed update or first dead letter would raise no alert.
_ACTIONS = ("update", "rollback", "traffic", "unload", "on_demand")
_OUTCOMES = ("done", "failed", "refused", "superseded")
_UPDATE_PHASES = ("preload", "validate", "swap", "cleanup")
#: What the consumer dead-letters: malformed messages, and internal errors before a job could run.
_DEAD_LETTER_CODES = sorted({*MALFORMED, ErrorCode.INTERNAL})

# Latencies from sub-millisecond decodes to multi-second CPU inference of big models.
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "hotswap_jobs",
            "Jobs answered, by model, version, status and error code (empty when ok).",
            ["model", "version", "status", "code"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "hotswap_job_phase_seconds",
            "Time per job phase: queue_wait, decode, inference, total.",
            ["model", "phase"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "hotswap_batch_size",
            "Images per inference batch (micro-batching).",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.in_flight = Gauge(
            "hotswap_jobs_in_flight", "Jobs received and not yet acked.", ["model"], registry=r
        )
        self.pixels_held = Gauge(
            "hotswap_decoded_pixels_held",
            "Pixels of the images being decoded or inferred (bounded by HOTSWAP_MAX_PIXELS_IN_FLIGHT).",
            registry=r,
        )
        self.jobs_waiting_for_pixels = Gauge(
            "hotswap_jobs_waiting_for_pixels", "Jobs whose image waits for room in the pixel budget.", registry=r
        )
        self.dead_lettered = Counter(
            "hotswap_jobs_dead_lettered",
            "Messages sent to the dead-letter queue, by model (queue) and error code.",
            ["model", "code"],
            registry=r,
        )
        self.results_unpublished = Counter(
            "hotswap_results_unpublished",
            "Results the broker did not confirm; their jobs go back to the queue (nack, requeue).",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "hotswap_model_version_info",
            "1 for each model version this worker holds, labelled with its state.",
            ["model", "version", "backend", "task", "state"],
            registry=r,
        )
        self.control_commands = Counter(
            "hotswap_control_commands",
            "Control commands by model, action and outcome (done, failed, refused, superseded).",
            ["model", "action", "outcome"],
            registry=r,
        )
        self.update_phase_seconds = Histogram(
            "hotswap_update_phase_seconds",
            "Time per update phase: preload, validate, swap, cleanup.",
            ["model", "phase"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.swaps = Counter("hotswap_swaps", "Deployment snapshots swapped in.", ["model"], registry=r)
        self.traffic_weight = Gauge(
            "hotswap_traffic_weight_percent", "Share of jobs routed to each version.", ["model", "version"], registry=r
        )
        self.shadow_agreement = Histogram(
            "hotswap_shadow_agreement_ratio",
            "Agreement of shadow runs with the primary (matched boxes / boxes).",
            ["model", "primary", "shadow"],
            buckets=(0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.version_inference_seconds = Histogram(
            "hotswap_version_inference_seconds",
            "Time each batch ran in the inference thread, per version, past its warm-up for that size.",
            ["model", "version"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.rollout_step = Gauge(
            "hotswap_rollout_candidate_percent",
            "The candidate's canary weight at the rollout's current step (0 in its shadow phase).",
            ["model", "candidate"],
            registry=r,
        )
        self.rollout_aborts = Counter(
            "hotswap_rollout_aborts",
            "Rollouts aborted, by the gate that failed (agreement, errors, latency, samples, operator).",
            ["model", "candidate", "gate"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "hotswap_shadow_dropped",
            "Shadow runs not started so as not to delay primary jobs, by reason (limit, backlog, pixels).",
            ["model", "shadow", "reason"],
            registry=r,
        )
        self.memory_released = Gauge(
            "hotswap_cleanup_memory_released_bytes",
            "Memory (RSS on CPU, CUDA allocated on GPU) given back by the last cleanup of a model.",
            ["model"],
            registry=r,
        )
        self.on_demand_loads = Counter(
            "hotswap_on_demand_loads",
            "Versions loaded on demand by a pinned job, by model and outcome (loaded, failed: refused by validation).",
            ["model", "outcome"],
            registry=r,
        )
        self.on_demand_evictions = Counter(
            "hotswap_on_demand_evictions",
            "On-demand versions unloaded, by model and reason (lru: room for another, idle: unused for "
            "idle_unload_s, withdrawn: no longer allowed).",
            ["model", "reason"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "hotswap_broker_connected", "1 while the AMQP connection is open.", registry=r
        )
        self.ready = Gauge(
            "hotswap_worker_ready", "1 while /readyz answers ready (connected, models loaded, consuming).", registry=r
        )
        # The job path's children, each looked up once: `labels()` checks its values and takes a lock
        # on every call (about 1 µs; seven calls a job). Safe because these series are never removed.
        self.jobs_of: Callable[[str, str, str, str], Counter] = functools.cache(self.jobs.labels)
        self.phase_of: Callable[[str, str], Histogram] = functools.cache(self.phase_seconds.labels)
        self.in_flight_of: Callable[[str], Gauge] = functools.cache(self.in_flight.labels)
        self.batch_size_of: Callable[[str], Histogram] = functools.cache(self.batch_size.labels)
        self.version_inference_of: Callable[[str, str], Histogram] = functools.cache(
            self.version_inference_seconds.labels)

    def expect_models(self, models: Iterable[str]) -> None:
        """Create the zero series of the counters alerts and annotations take increase() of."""
        for model in models:
            self.swaps.labels(model)
            for action in _ACTIONS:
                for outcome in _OUTCOMES:
                    self.control_commands.labels(model, action, outcome)
            for phase in _UPDATE_PHASES:
                self.update_phase_seconds.labels(model, phase)
            for code in _DEAD_LETTER_CODES:
                self.dead_lettered.labels(model, code)
            for outcome in LOAD_OUTCOMES:
                self.on_demand_loads.labels(model, outcome)
            for reason in EVICTION_REASONS:
                self.on_demand_evictions.labels(model, reason)

    def observe_deployments(self, deployments: dict[str, DeploymentStatus]) -> None:
        """Version info and traffic weights, from the deployments' own status: what is gone goes."""
        self.model_info.clear()
        self.traffic_weight.clear()
        for model, deployment in deployments.items():
            for name, weight in (deployment.weights or {deployment.active: 100.0}).items():
                self.traffic_weight.labels(model, name).set(weight)
            for name, version in deployment.versions.items():
                self.model_info.labels(model, name, version.backend or "", version.task or "", version.state).set(1)

    def observe_ready(self, not_ready_reasons: list[str]) -> None:
        self.ready.set(int(not not_ready_reasons))

    def observe_pixels(self, held: int, waiting: int) -> None:
        self.pixels_held.set(held)
        self.jobs_waiting_for_pixels.set(waiting)
