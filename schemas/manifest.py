"""`manifest.json`: what a model version directory in the repository holds.

Layout: `<root>/<model>/<version>/manifest.json` beside the artifact it pins by sha256, and the
calibration images its expectations refer to (paths relative to the version directory).

An artifact cannot run code (invariant 6): its `format` says how it is read, and weights
(`safetensors`, `state-dict`) come with the network's `architecture` as declarative config. A
`pickle` is code; a worker loads one only when the manifest says so and it opts in.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, NamedTuple

from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PackagingRequirement
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.outputs import Rle

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"

ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
VersionName = Annotated[str, Field(pattern=VERSION_PATTERN)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

def _requirement(text: str) -> str:
    try:
        PackagingRequirement(text)
    except InvalidRequirement as exc:
        raise ValueError(f"not a PEP 508 requirement: {exc}") from exc
    return text


Requirement = Annotated[str, AfterValidator(_requirement)]

Task = Literal["detect", "segment", "pose", "classify", "face-detection", "human-parsing"]

#: safetensors: tensors only, nothing in the file can execute. state-dict: a `torch.save`d mapping of
#: names to tensors, read with `torch.load(weights_only=True)`. pickle: a whole pickled checkpoint
#: (e.g. an ultralytics .pt), code when loaded. json: a backend's own declarative spec (trivial).
ArtifactFormat = Literal["safetensors", "state-dict", "pickle", "json"]
WEIGHTS_FORMATS: tuple[ArtifactFormat, ...] = ("safetensors", "state-dict")


class Contract(NamedTuple):
    """The shape of a version's answers. An update that changes it is refused unless the command
    says the contract changes: producers must not get another shape of answer by surprise."""

    task: str
    classes: tuple[tuple[int, str], ...]
    keypoints: tuple[str, ...]

    def changes_to(self, other: Contract) -> list[str]:
        """What differs, in words; empty when nothing does."""
        changes = []
        if self.task != other.task:
            changes.append(f"task {self.task} → {other.task}")
        if self.classes != other.classes:
            changes.append(f"classes {_names(self.classes)} → {_names(other.classes)}")
        if self.keypoints != other.keypoints:
            changes.append(f"keypoints {list(self.keypoints)} → {list(other.keypoints)}")
        return changes


def _names(classes: tuple[tuple[int, str], ...]) -> str:
    shown = ", ".join(f"{i}: {name}" for i, name in classes[:6])
    return "{" + shown + (", …" if len(classes) > 6 else "") + "}"


class ExpectedObject(BaseModel):
    """Something a calibration image holds, as the task's evaluator compares it: a box for every
    task that finds objects, a mask for segment and human-parsing parts, keypoints for pose and
    face landmarks, the class alone for classify."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    class_name: str
    box: tuple[float, float, float, float] | None = Field(None, description="x1, y1, x2, y2 in pixels")
    mask: Rle | None = Field(None, description="segment: the instance; human-parsing: the part")
    keypoints: list[tuple[float, float, float]] | None = Field(
        None, description="x, y, visibility (0: not labelled) per keypoint name, in the manifest's order"
    )


#: The name calibration expectations had when every model detected.
ExpectedBox = ExpectedObject


class CalibrationImage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="path relative to the version directory")
    expected: list[ExpectedObject]

    @field_validator("file")
    @classmethod
    def _stay_inside(cls, value: str) -> str:
        # A manifest is input too: it must not point the validator at files elsewhere.
        if value.startswith("/") or ".." in re.split(r"[\\/]", value):
            raise ValueError("calibration paths must stay inside the version directory")
        return value


class Calibration(BaseModel):
    """Images with known content and how well a version must do on them to be served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: list[CalibrationImage]
    min_recall: float = Field(ge=0, le=1, description="share of expected objects found")
    match_iou: float = Field(0.5, gt=0, le=1, description="box or mask IoU for an object to count as found")
    min_oks: float = Field(0.5, gt=0, le=1, description="keypoint similarity (OKS) for keypoints to count")
    conf: float = Field(0.25, ge=0, le=1)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: Literal[2] = 2
    name: ModelName
    version: VersionName
    backend: str = Field(description="backend that loads the artifact, e.g. ultralytics")
    task: Task
    artifact: str = Field(description="artifact file name inside the version directory")
    format: ArtifactFormat = Field(description="how the artifact is read; pickle needs the worker's opt-in")
    architecture: dict[str, Any] | None = Field(
        None, description="the network as declarative config, which weights formats need "
        "(ultralytics: the model's yaml dict: layers by module name, literal arguments)",
    )
    sha256: Sha256
    classes: dict[int, str] = Field(description="class, or for human-parsing part, names by id")
    keypoints: list[str] | None = Field(None, description="pose: keypoint names; face-detection: landmark names")
    skeleton: list[tuple[int, int]] | None = Field(None, description="pose: keypoint index pairs to draw")
    requires: list[Requirement] = Field(
        default_factory=list, description="libraries the artifact needs, e.g. 'modelscope>=1.9', 'torch<3' "
        "(PEP 508), checked at preload against the worker's environment",
    )
    input_size: int = Field(ge=32, le=4096)
    calibration: Calibration | None = None
    created_at: AwareDatetime
    lineage: dict[str, Any] = Field(
        default_factory=dict, description="parent version, data set, recipe, metrics"
    )

    @model_validator(mode="before")
    @classmethod
    def _current_schema(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schema_version") == 1:
            raise ValueError("manifest schema_version 1 predates artifact formats (format, architecture): "
                             "rebuild the version or write its manifest again")
        return data

    @model_validator(mode="after")
    def _weights_need_an_architecture(self) -> Manifest:
        if self.format in WEIGHTS_FORMATS and self.architecture is None:
            raise ValueError(f"a {self.format} artifact holds weights only: the manifest needs the architecture")
        return self

    @property
    def contract(self) -> Contract:
        """What producers see of this version: its task and the names in its answers."""
        return Contract(self.task, tuple(sorted(self.classes.items())), tuple(self.keypoints or ()))

    @field_validator("artifact")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value in {".", ".."}:
            raise ValueError("artifact must be a plain file name inside the version directory")
        return value
