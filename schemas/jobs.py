"""Wire contract of the job path: the job a producer publishes and the result it gets back.

Both are JSON documents carrying `schema_version`. Producers in other languages follow the JSON
Schemas in `schemas/json/` (regenerate with `hotswap schema --write`). Times on the wire are
milliseconds; images travel as standard base64 (RFC 4648 §4, with padding) or as a URL.
"""

from __future__ import annotations

import base64
import binascii
import json
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

from schemas.errors import ErrorCode
from schemas.manifest import MODEL_NAME_PATTERN, VERSION_PATTERN
from schemas.urls import parse_image_url

SCHEMA_VERSION: Literal[1] = 1


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
    job_id: str = Field(min_length=1, max_length=128)
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
    detections: list[Detection] = []
    error: JobError | None = None

    @model_validator(mode="after")
    def _error_iff_failed(self) -> JobResult:
        if (self.status == "error") != (self.error is not None):
            raise ValueError("an error result carries `error`, and only an error result does")
        return self


class MalformedJob(Exception):
    """A message body that is not a valid job; carries the code the producer gets back."""

    def __init__(self, code: ErrorCode, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


def parse_job(body: bytes) -> Job:
    """Validate a message body, raising `MalformedJob` with the most specific code."""
    try:
        return Job.model_validate_json(body)  # straight from bytes: the image is never a Python str
    except ValidationError as exc:
        code, message = _classify(exc)
        raise MalformedJob(code, message, _job_id_of(body)) from exc


def _job_id_of(body: bytes) -> str | None:
    """The job id of a malformed job, when it has one, so its error result can name it."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    job_id = raw.get("job_id") if isinstance(raw, dict) else None
    return job_id if isinstance(job_id, str) else None


def _classify(exc: ValidationError) -> tuple[ErrorCode, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ErrorCode.INVALID_JSON, f"body is not JSON: {first['msg']}"
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
