"""What a worker's `/status` answers: one typed document, each part reported by its owner (the
deployments by the model runtime, job counts by the processor, control by the control loop).
Heartbeats on the status exchange carry the control-plane view (`schemas.control.Heartbeat`)."""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.control import Shadow


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class VersionDetail(_Wire):
    state: str
    reason: str | None = None
    in_flight: int = 0
    backend: str | None = None
    task: str | None = None
    sha256: str | None = None
    on_demand: bool = Field(False, description="loaded on demand by a pinned job (takes pinned jobs only)")
    last_used: AwareDatetime | None = Field(None, description="on-demand versions: when a job last ran on it")


class DeploymentStatus(_Wire):
    active: str
    weights: dict[str, float] | None = Field(None, description="percent per version; None: all to active")
    shadow: Shadow | None = None
    versions: dict[str, VersionDetail]


class LastError(_Wire):
    job_id: str
    code: str
    message: str
    at: AwareDatetime


class CleanupRecord(_Wire):
    version: str
    memory_before: int
    memory_after: int


class ControlStatus(_Wire):
    applied_seq: dict[str, int]
    last_error: str | None = None
    unusable: dict[str, dict[str, str]] = Field(description="per model, versions that failed here, with why")
    cleanups: list[CleanupRecord] = Field(description="the last few, memory in bytes before and after")


class WorkerStatus(_Wire):
    worker_id: str
    host: str
    pid: int
    uptime_s: float
    ready: bool
    hung: str | None = None
    broker_connected: bool
    in_flight: int
    jobs_done: int
    jobs_failed: int
    last_error: LastError | None = None
    models: dict[str, DeploymentStatus]
    control: ControlStatus | None = None
