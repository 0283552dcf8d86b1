"""Wire contracts shared by producers, workers and operators (pydantic v2)."""

from schemas.errors import MALFORMED, ErrorCode, JobFailure
from schemas.jobs import (
    SCHEMA_VERSION,
    Box,
    Detection,
    ImageInfo,
    InferenceParams,
    InlineImage,
    Job,
    JobError,
    JobResult,
    Timings,
    UrlImage,
    parse_job,
)
from schemas.manifest import Calibration, CalibrationImage, ExpectedBox, Manifest
from schemas.topology import Topology

__all__ = [
    "MALFORMED",
    "SCHEMA_VERSION",
    "Box",
    "Calibration",
    "CalibrationImage",
    "Detection",
    "ErrorCode",
    "ExpectedBox",
    "ImageInfo",
    "InferenceParams",
    "InlineImage",
    "Job",
    "JobError",
    "JobFailure",
    "JobResult",
    "Manifest",
    "Timings",
    "Topology",
    "UrlImage",
    "parse_job",
]
