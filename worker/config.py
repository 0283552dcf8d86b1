"""Worker settings: environment (`HOTSWAP_*`) first, then command-line flags override."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field, IPvAnyNetwork, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.topology import Topology
from worker.cpus import parse_cpu_list
from worker.logs import LogFormat
from worker.runtime.sources import SourcePolicy

#: The replica setting, read by the operator and the client too: their declarations must match the workers'.
REPLICAS_ENV = "HOTSWAP_QUEUE_REPLICAS"


def replicas_from_env() -> int | None:
    """`HOTSWAP_QUEUE_REPLICAS` (unset or empty: None, the broker's default)."""
    text = os.environ.get(REPLICAS_ENV, "").strip()
    if not text:
        return None
    replicas = int(text)
    if replicas < 1:
        raise ValueError(f"{REPLICAS_ENV} must be at least 1, not {replicas}")
    return replicas


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSWAP_", extra="ignore")

    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="broker URL; a cluster's nodes comma separated, tried in order and failed over to",
    )
    amqp_heartbeat_s: int = Field(
        10, ge=0, le=600, description="AMQP heartbeat: a stopped worker's jobs come back after about this (0: off)"
    )
    namespace: str = Field("hotswap", pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    queue_replicas: int | None = Field(
        None, ge=1, le=99,
        description="nodes each job queue, dead-letter queue and the control log start on (unset: the "
                    "broker's default); every worker, operator and producer of a namespace must agree",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="MODEL or MODEL@VERSION, comma separated in the env"
    )
    model_root: Path = Path("models")
    worker_id: str = Field(default_factory=_default_worker_id)
    device: str = "cpu"

    prefetch: int = Field(32, ge=1, le=10_000, description="two batches: one runs while the next fills")
    delivery_limit: int = Field(3, ge=1, le=1000, description="quorum queue x-delivery-limit")
    torch_threads: int = Field(1, ge=1, le=256)
    max_batch: int = Field(16, ge=1, le=256, description="jobs per inference batch at most")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a job waits for its batch to fill")
    decode_threads: int = Field(2, ge=1, le=64)
    inference_cpus: Annotated[frozenset[int], NoDecode] = Field(
        frozenset(), description="CPUs the inference thread keeps to itself, the worker's other threads "
        "running on the rest (taskset -c syntax: 3, 2,3, 4-7; empty: anywhere; worker.cpus)"
    )
    allocator_keep_mib: int = Field(
        256, ge=0, le=2047, description="freed memory the C heap keeps mapped for the next batch "
        "(glibc; 0: its defaults, which give a batch's memory back and fault it in again)"
    )
    profile: bool = Field(False, description="time the job path's steps in CPU (GET /profile; the bench's --profile)")
    grace_period_s: float = Field(30.0, ge=0)
    inference_timeout_s: float = Field(
        120.0, gt=0, description="a batch running longer means a hung worker: it stops and exits for its jobs"
    )
    hung_exit_delay_s: float = Field(2.0, ge=0, description="a hung worker says why on /readyz this long, then exits")
    max_shadow_in_flight: int = Field(16, ge=0, le=10_000, description="shadow runs at once; more are dropped")

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_pixels_in_flight: int = Field(
        160_000_000, ge=1, description="decoded pixels held at once by the jobs in flight (memory bound)"
    )
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="a whole image URL fetch, redirects included")
    image_read_timeout_s: float = Field(5.0, gt=0, description="one connect, or one wait for more of the body")
    image_file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories file:// image URLs may read from"
    )
    image_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts http(s) image URLs may name: name, *.suffix, *, or IP; :port or :* (worker.fetch)",
    )
    image_url_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list, description="CIDRs image URLs may reach although private, loopback, …"
    )

    control_public_key: Path | None = Field(None, description="Ed25519 key verifying control commands")
    worker_key: Path | None = Field(
        None, description="Ed25519 key signing status events; default: worker.key beside control_public_key"
    )
    artifact_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="file:// or http(s):// sources artifacts may be fetched from, comma separated"
    )
    allow_pickle: bool = Field(
        False, description="load pickled checkpoints (code) where a manifest says format pickle; off: refused"
    )
    artifact_cache: Path = Path.home() / ".cache" / "hotswap" / "artifacts"
    peer_artifacts: bool = Field(
        True, description="serve verified artifacts to the fleet's workers and fetch from them before the "
        "source (needs the control plane: requests are signed with the worker key)"
    )
    peer_url: str | None = Field(
        None, description="the URL peers reach this worker's status server at; default: the status server's own "
        "(a 0.0.0.0 bind: this host's name)", pattern=r"^https?://"
    )
    peer_source_concurrency: int = Field(
        2, ge=1, le=1000, description="workers of a fleet fetching one artifact from its source at once; the "
        "others wait for a peer"
    )
    peer_wait_s: float = Field(120.0, ge=0, description="longest a worker waits for peers before the source")
    peer_uploads: int = Field(4, ge=1, le=256, description="artifacts a worker sends to peers at once; more get 503")
    keep_standby: int = Field(1, ge=0, le=16, description="earlier versions kept warm for rollback")
    load_slots: int = Field(
        1, ge=0, le=256, description="versions this host's workers preload and validate at once; the others wait "
        "their turn (0: no limit; worker.runtime.load_slots)"
    )
    load_slot_dir: Path = Field(
        Path(tempfile.gettempdir()), description="where the load slots' lock files are: a directory every worker "
        "of the host shares"
    )
    load_slot_wait_s: float = Field(60.0, ge=0, description="longest a load waits for a slot; then it goes ahead")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    latency_budget_factor: float = Field(1.5, gt=0, description="new p50 ≤ factor × active p50")
    control_nice: int = Field(
        19, ge=0, le=19, description="niceness of the thread that loads, validates and frees versions"
    )

    log_format: LogFormat = Field(
        "text", description="json: one JSON object per line, with job and command ids as fields (worker.logs)"
    )

    status_host: str = "127.0.0.1"
    status_port: int = Field(8080, ge=0, le=65535, description="0 picks a free port")

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace, replicas=self.queue_replicas)

    @property
    def worker_key_path(self) -> Path | None:
        """The key that signs this worker's status events (`hotswap keys generate` writes it beside
        control.pub)."""
        if self.worker_key is not None:
            return self.worker_key
        if self.control_public_key is not None:
            return self.control_public_key.parent / "worker.key"
        return None

    @field_validator(
        "models", "image_file_roots", "image_url_hosts", "image_url_networks", "artifact_sources", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # NoDecode hands comma-separated environment values over as plain strings.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("inference_cpus", mode="before")
    @classmethod
    def _parse_cpus(cls, value: object) -> object:
        return parse_cpu_list(value) if isinstance(value, str) else value

    @field_validator("artifact_sources")
    @classmethod
    def _valid_sources(cls, value: list[str]) -> list[str]:
        SourcePolicy(value)  # a malformed source stops the worker at start, not at the first update
        return value
