"""Prometheus metrics of one worker process, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.in_flight = Gauge(
            "hotswap_jobs_in_flight", "Jobs received and not yet acked.", ["model"], registry=r
        )
        self.dead_lettered = Counter(
            "hotswap_jobs_dead_lettered",
            "Messages sent to the dead-letter queue, by model (queue) and error code.",
            ["model", "code"],
            registry=r,
        )
        self.results_unpublished = Counter(
            "hotswap_results_unpublished",
            "Results the broker did not confirm; their jobs stay unacked and are redelivered.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "hotswap_model_version_info",
            "1 for each model version this worker holds, labelled with its state.",
            ["model", "version", "backend", "task", "state"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "hotswap_broker_connected", "1 while the AMQP connection is open.", registry=r
        )
