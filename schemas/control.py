"""Wire contract of the control plane: signed commands, progress events, heartbeats.

A command travels as a `SignedEnvelope` whose `body` is the command's JSON text, signed as
those exact bytes (Ed25519): no canonical-JSON rules to agree on, in any language.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.manifest import ModelName, Sha256, VersionName
from schemas.rollout import ModelEvidence, RolloutMark


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactRef(_Wire):
    """Where a version's artifact comes from when it is not in the model repository already."""

    uri: str = Field(pattern=r"^(file|https?)://", max_length=4096)
    sha256: Sha256


class Update(_Wire):
    kind: Literal["update"] = "update"
    version: VersionName
    artifact: ArtifactRef | None = Field(None, description="None: the repository's version directory")
    activate: Literal["now", "standby", "canary"] = "now"
    canary_percent: float | None = Field(None, gt=0, lt=100, description="with activate=canary")
    new_contract: bool = Field(False, description="the version may change the task or the class or keypoint "
                               "names producers see; without it such a version is refused")

    @model_validator(mode="after")
    def _canary_needs_a_share(self) -> Update:
        if (self.activate == "canary") != (self.canary_percent is not None):
            raise ValueError("canary_percent is given exactly when activate is 'canary'")
        return self


class Rollback(_Wire):
    kind: Literal["rollback"] = "rollback"
    to: VersionName | None = Field(None, description="None: the version active before this one")


class Shadow(_Wire):
    version: VersionName
    percent: float = Field(gt=0, le=100, description="share of jobs also run on the shadow version")


class Traffic(_Wire):
    kind: Literal["traffic"] = "traffic"
    weights: dict[VersionName, float] = Field(min_length=1, description="percent per version, sum 100")
    shadow: Shadow | None = None

    @model_validator(mode="after")
    def _weights_add_up(self) -> Traffic:
        if any(w < 0 for w in self.weights.values()) or abs(sum(self.weights.values()) - 100) > 1e-6:
            raise ValueError("weights are percentages ≥ 0 that add up to 100")
        return self


class Unload(_Wire):
    kind: Literal["unload"] = "unload"
    version: VersionName


class OnDemand(_Wire):
    """Versions loaded lazily by the first job pinned to one, serving pinned jobs only, and unloaded
    when idle or when more than `max_warm` are warm (the least recently used idle one goes)."""

    kind: Literal["on_demand"] = "on_demand"
    versions: list[VersionName] = Field(max_length=256, description="versions a pinned job may load on "
                                        "demand; [] turns loading on demand off (and unloads them)")
    max_warm: int = Field(2, ge=1, le=64, description="on-demand versions kept loaded at most")
    idle_unload_s: float = Field(300.0, gt=0, description="an on-demand version unused this long is unloaded")

    @model_validator(mode="after")
    def _versions_once(self) -> OnDemand:
        if len(set(self.versions)) != len(self.versions):
            raise ValueError("each version is listed once")
        return self


Action = Annotated[Update | Rollback | Traffic | Unload | OnDemand, Field(discriminator="kind")]


class Command(_Wire):
    schema_version: Literal[1] = 1
    command_id: str = Field(min_length=1, max_length=64)
    model: ModelName
    seq: int = Field(ge=1, description="per-model sequence number: applied at most once, in order")
    issued_at: AwareDatetime
    issuer: str = Field(max_length=128)
    action: Action
    rollout: RolloutMark | None = Field(None, description="the rollout this command is a step of (hotswap rollout)")


class SignedEnvelope(_Wire):
    schema_version: Literal[1] = 1
    key_id: str = Field(description="sha256 prefix of the public key that verifies this")
    body: str = Field(description="the Command's JSON text, exactly as signed")
    signature: str = Field(description="Ed25519 signature of body's UTF-8 bytes, standard base64")


Phase = Literal["received", "preload", "validate", "swap", "cleanup", "done", "failed", "refused"]


class Progress(_Wire):
    """One worker's progress through one command."""

    kind: Literal["progress"] = "progress"
    worker_id: str
    command_id: str
    model: str
    seq: int
    phase: Phase
    reason: str | None = None
    seconds: float | None = Field(None, description="time the finished phase took")
    at: datetime


class VersionStatus(_Wire):
    state: str
    reason: str | None = None
    weight: float = 0.0
    in_flight: int = Field(0, ge=0, description="jobs running on this version now (the web console shows it)")
    on_demand: bool = Field(False, description="loaded on demand by a pinned job (takes pinned jobs only)")
    last_used: datetime | None = Field(None, description="on-demand versions: when a job last ran on it")


class ModelStatus(_Wire):
    active: str | None
    versions: dict[str, VersionStatus]
    shadow: Shadow | None = None
    last_seq: int = 0
    rollout: RolloutMark | None = Field(None, description="the rollout step of the newest applied command, if any")


#: Artifacts a heartbeat lists at most: the newest ones a worker holds (a heartbeat stays small).
MAX_ANNOUNCED_ARTIFACTS = 64


class Heartbeat(_Wire):
    kind: Literal["heartbeat"] = "heartbeat"
    worker_id: str
    at: datetime
    models: dict[str, ModelStatus]
    last_error: str | None = None
    peer_url: str | None = Field(None, max_length=2048, description="where this worker serves its verified "
                                 "artifacts to the fleet (`GET <peer_url>/artifacts/<sha256>`); None: it does not")
    artifacts: list[Sha256] = Field(default_factory=list, max_length=MAX_ANNOUNCED_ARTIFACTS,
                                    description="sha256 of the verified artifacts it serves to peers, newest first")
    fetching: list[Sha256] = Field(default_factory=list, max_length=MAX_ANNOUNCED_ARTIFACTS,
                                   description="sha256 of the artifacts it is fetching from their source now")
    evidence: dict[str, ModelEvidence] = Field(default_factory=dict, description="per model, what its versions "
                                               "answered: what a rollout judges a candidate by")


class ArtifactRequest(_Wire):
    """A worker asking a peer for a verified artifact: sent signed with the fleet's worker key, so
    that only workers of the fleet are served, and only this artifact, by this peer, for a minute."""

    kind: Literal["artifact-request"] = "artifact-request"
    worker_id: str = Field(description="who asks")
    to: str = Field(description="the peer asked (its worker id): a request sent to one peer is no good at another")
    sha256: Sha256
    at: AwareDatetime


StatusEvent = Annotated[Progress | Heartbeat, Field(discriminator="kind")]
