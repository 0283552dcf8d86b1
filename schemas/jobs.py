"""Wire contract of the job path: the job a producer publishes and the result it gets back.

Both are JSON documents carrying `schema_version`. Producers in other languages follow the JSON
Schemas in `schemas/json/` (regenerate with `hotswap schema --write`). Times on the wire are
milliseconds; images travel as standard base64 (RFC 4648 §4, with padding) or as a URL.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.errors import ErrorCode, JobFailure
from schemas.manifest import MODEL_NAME_PATTERN, VERSION_PATTERN
from schemas.outputs import TaskOutput, per_detection
from schemas.urls import parse_image_url

SCHEMA_VERSION: Literal[1] = 1
JOB_ID_MAX_LENGTH = 128


def _decode_base64(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, str):
        return value  # Python callers hand over raw bytes
    if info.mode == "json":
        # pydantic-core decodes it (InlineImage's `val_json_bytes`), 6× faster than binascii and
        # without a Python copy of the text; but it also takes the URL-safe alphabet and missing
        # padding, which standard base64 does not.
        if len(value) % 4 or "-" in value or "_" in value:
            raise PydanticCustomError(
                "bad_base64", "image data is not valid base64: {reason}",
                {"reason": "standard base64 (RFC 4648 §4) with padding is expected"},
            )
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PydanticCustomError(
            "bad_base64", "image data is not valid base64: {reason}", {"reason": str(exc)}
        ) from exc


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_decode_base64),
    PlainSerializer(lambda raw: base64.b64encode(raw).decode("ascii"), when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InlineImage(_Wire):
    model_config = ConfigDict(val_json_bytes="base64")

    kind: Literal["inline"] = "inline"
    data: Base64Bytes = Field(description="encoded JPEG, PNG or WebP bytes, base64")


class UrlImage(_Wire):
    kind: Literal["url"] = "url"
    url: str = Field(
        pattern=r"^(https?|file)://", max_length=4096, description="http(s) or allowed file URL"
    )

    @field_validator("url")
    @classmethod
    def _fetchable(cls, url: str) -> str:
        # A URL no worker could fetch is malformed (`invalid_job`), whatever the workers allow.
        parse_image_url(url)  # ValueError saying why not
        return url


def _image_kind(value: object) -> str:
    # `kind` may be left out: a `url` key says which it is.
    if isinstance(value, dict):
        return str(value.get("kind") or ("url" if "url" in value else "inline"))
    return str(getattr(value, "kind", "inline"))


ImageSource = Annotated[
    Annotated[InlineImage, Tag("inline")] | Annotated[UrlImage, Tag("url")],
    Discriminator(_image_kind),
]


class InferenceParams(_Wire):
    conf: float = Field(0.25, ge=0, le=1, description="minimum detection score")
    iou: float = Field(0.7, ge=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(300, ge=1, le=1000)
    imgsz: int | None = Field(None, ge=32, le=2048, description="None: the model's input size")


class Job(_Wire):
    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str = Field(min_length=1, max_length=JOB_ID_MAX_LENGTH)
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str | None = Field(None, pattern=VERSION_PATTERN, description="pin a version")
    routing_key: str | None = Field(None, max_length=256, description="sticky A/B routing")
    image: ImageSource
    params: InferenceParams = InferenceParams()
    deadline: AwareDatetime | None = Field(None, description="answer `expired` after this")
    submitted_at: AwareDatetime | None = Field(None, description="for queue-wait timing")


class Box(_Wire):
    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def of(cls, xyxy: Sequence[float]) -> Box:
        return cls(x1=xyxy[0], y1=xyxy[1], x2=xyxy[2], y2=xyxy[3])

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def iou(self, other: Box) -> float:
        """Intersection over union, 0 for disjoint or empty boxes."""
        width = min(self.x2, other.x2) - max(self.x1, other.x1)
        height = min(self.y2, other.y2) - max(self.y1, other.y1)
        inter = max(0.0, width) * max(0.0, height)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


class Detection(_Wire):
    class_id: int
    class_name: str
    score: float
    box: Box = Field(description="pixels of the original image")


class Timings(_Wire):
    queue_wait_ms: float | None = Field(None, description="None when not submitted_at")
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class ImageInfo(_Wire):
    width: int
    height: int


class JobError(_Wire):
    code: ErrorCode
    message: str


class JobResult(_Wire):
    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    status: Literal["ok", "error"]
    model: str | None = None
    version: str | None = None
    worker_id: str
    attempt: int = Field(1, ge=1, description="delivery attempt that produced this result")
    timings: Timings = Timings()
    image: ImageInfo | None = None
    detections: list[Detection] = Field(default=[], description="what the model found, box, class and score, "
                                        "for every task that finds objects")
    output: TaskOutput | None = Field(None, description="the task, and what it adds to each detection "
                                      "(masks, keypoints, landmarks) or to the image (parts, classes)")
    error: JobError | None = None

    @model_validator(mode="after")
    def _error_iff_failed(self) -> JobResult:
        if (self.status == "error") != (self.error is not None):
            raise ValueError("an error result carries `error`, and only an error result does")
        if self.output is not None:
            tied = per_detection(self.output)
            if tied is not None and tied != len(self.detections):
                raise ValueError(f"{self.output.task} output has {tied} entries for {len(self.detections)} detections")
        return self

    @property
    def task(self) -> str | None:
        return self.output.task if self.output is not None else None


def parse_job(body: bytes) -> Job:
    """Validate a message body, raising `JobFailure` with the most specific code and the id if readable."""
    try:
        return Job.model_validate_json(body)  # straight from bytes: the image is never a Python str
    except ValidationError as exc:
        code, message = _classify(exc, body)
        raise JobFailure(code, message, _job_id_of(body)) from exc


class _JobIdOnly(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: object = None


def _job_id_of(body: bytes) -> str | None:
    """The job id of a malformed job, when it has a usable one, so its error result can name it.

    Parsed by pydantic-core, like the job itself: it has a nesting limit and takes no lone
    surrogates, where `json.loads` raises RecursionError or hands back text UTF-8 cannot encode.
    """
    try:
        job_id = _JobIdOnly.model_validate_json(body).job_id
    except ValidationError:
        return None
    return job_id if isinstance(job_id, str) and 0 < len(job_id) <= JOB_ID_MAX_LENGTH else None


# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the second without the first.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
# What pydantic-core refuses in JSON that is well formed: a job beyond this contract's limits.
_BEYOND_LIMITS = ("recursion limit exceeded", "number out of range")


def _classify_json(message: str, body: bytes) -> tuple[ErrorCode, str]:
    if (lone := _LONE_SURROGATE.search(body)) is not None:
        escape = lone.group().decode("ascii")
        return ErrorCode.INVALID_JOB, f"a JSON string holds a lone surrogate ({escape}): text UTF-8 cannot encode"
    if any(limit in message for limit in _BEYOND_LIMITS):
        return ErrorCode.INVALID_JOB, f"the body is beyond what a job may be: {message}"
    return ErrorCode.INVALID_JSON, f"body is not JSON: {message}"


def _classify(exc: ValidationError, body: bytes) -> tuple[ErrorCode, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return _classify_json(first["msg"], body)
    if first["loc"] == () and first["type"] == "model_type":
        return ErrorCode.INVALID_JOB, "a job is a JSON object"
    for err in errors:
        loc = err["loc"]
        if loc == ("schema_version",):
            return ErrorCode.UNSUPPORTED_SCHEMA, f"schema_version must be {SCHEMA_VERSION}"
        if loc == ("image",) and err["type"] == "missing":
            return ErrorCode.MISSING_IMAGE, "the job has no `image`"
        if err["type"] in ("bad_base64", "bytes_invalid_encoding"):
            return ErrorCode.BAD_BASE64, err["msg"]
    for err in errors:
        if err["loc"][:1] == ("params",):
            return ErrorCode.INVALID_PARAMS, _describe(err)
    return ErrorCode.INVALID_JOB, _describe(first)


def _describe(err: Any) -> str:
    where = ".".join(str(part) for part in err["loc"]) or "job"
    return f"{where}: {err['msg']}"
