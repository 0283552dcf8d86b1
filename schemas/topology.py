"""AMQP names: part of the contract, since producers in any language publish to them.

A producer publishes a job (JSON, `content_type: application/json`) to the direct exchange
`<ns>.jobs` with the model name as routing key, sets `reply_to` to a queue it consumes and
`correlation_id` to the job id, and asks for `mandatory` so a model nobody serves comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The AMQP `type` of an empty marker a reader publishes on the control exchange: when it comes back
#: through the stream, the reader has read the whole log up to the moment it asked.
SYNC_TYPE = "hotswap.sync"
#: The AMQP `type` of each other message: a consumer tells them apart without parsing the body.
JOB_TYPE = "hotswap.job"
RESULT_TYPE = "hotswap.result"
PROGRESS_TYPE = "hotswap.progress"
HEARTBEAT_TYPE = "hotswap.heartbeat"


@dataclass(frozen=True)
class Topology:
    namespace: str = "hotswap"
    #: Nodes each replicated entity starts on (job and dead-letter queues, the control log, and a
    #: producer's reply queue), or None: the broker's default, and nothing asked of a single node.
    #: Part of each entity's arguments: every process declaring the same entity must agree.
    replicas: int | None = None

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {self.replicas}")

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.jobs.dlx"

    @property
    def control_exchange(self) -> str:
        """Fanout exchange the operator publishes signed commands to."""
        return f"{self.namespace}.control"

    @property
    def control_log(self) -> str:
        """Stream every worker reads from the start: the replayable control history."""
        return f"{self.namespace}.control.log"

    @property
    def status_exchange(self) -> str:
        """Topic exchange of progress (`progress.<model>.<worker>`) and heartbeats (`heartbeat.<worker>`)."""
        return f"{self.namespace}.status"

    def progress_key(self, model: str, worker_id: str) -> str:
        """Routing key of a worker's progress through a command on the status exchange."""
        return f"progress.{model}.{worker_id}"

    def heartbeat_key(self, worker_id: str) -> str:
        return f"heartbeat.{worker_id}"

    def job_queue(self, model: str) -> str:
        return f"{self.namespace}.jobs.{model}"

    def dead_letter_queue(self, model: str) -> str:
        return f"{self.namespace}.jobs.{model}.dead"

    @property
    def fleet_bench_classic_queue(self) -> str:
        """The fleet bench's classic queue (`hotswap loadtest fleet-bounds`), measured beside a job
        queue for comparison: no worker consumes it and nothing else publishes to it."""
        return f"{self.namespace}.classic"
