"""The closed set of error codes a job result can carry.

Producers branch on these codes, so they are part of the wire contract: add new ones, never
rename or reuse one. The README lists what each means to a producer.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # The message itself is malformed: it is answered (when it names a reply queue) and
    # dead-lettered, because no retry can ever succeed.
    INVALID_JSON = "invalid_json"
    INVALID_JOB = "invalid_job"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    MISSING_IMAGE = "missing_image"
    BAD_BASE64 = "bad_base64"
    INVALID_PARAMS = "invalid_params"
    MISSING_REPLY_TO = "missing_reply_to"

    # The job is well formed but cannot be served as asked: answered and acked.
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    EMPTY_IMAGE = "empty_image"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    # The worker's policy will not fetch that URL (host or address not allowed, a redirect off
    # the allowed hosts, a file outside the allowed roots): retrying cannot help.
    IMAGE_URL_REFUSED = "image_url_refused"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    # A pinned version allowed on demand failed to load or validate on this worker: permanent
    # until an operator allows it again (`hotswap on-demand`) or updates to it.
    VERSION_UNUSABLE = "version_unusable"
    EXPIRED = "expired"

    # Our fault, not the producer's.
    INFERENCE_FAILED = "inference_failed"
    INTERNAL = "internal"


#: Codes whose message can never be processed, whatever worker takes it: they go to the
#: dead-letter queue so an operator can inspect them.
MALFORMED: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_JSON,
        ErrorCode.INVALID_JOB,
        ErrorCode.UNSUPPORTED_SCHEMA,
        ErrorCode.MISSING_IMAGE,
        ErrorCode.BAD_BASE64,
        ErrorCode.INVALID_PARAMS,
        ErrorCode.MISSING_REPLY_TO,
    }
)


class JobFailure(Exception):
    """Why a job cannot be served: the code and message its error result carries. Raised wherever
    the job path finds out (parsing, fetching, decoding, routing, inference); `job_id` is set when
    the failure comes before the job is known (a malformed body whose id could still be read)."""

    def __init__(self, code: ErrorCode, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id
