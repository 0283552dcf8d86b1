import base64
import json
from datetime import UTC, datetime

import pytest

from schemas.errors import ErrorCode, JobFailure
from schemas.jobs import InlineImage, Job, JobError, JobResult, UrlImage, parse_job


def body(**fields: object) -> bytes:
    job: dict[str, object] = {"job_id": "j1", "model": "shapes", "image": {"data": "aGk="}}
    job.update(fields)
    return json.dumps({k: v for k, v in job.items() if v is not None}).encode()


def code_of(raw: bytes) -> ErrorCode:
    with pytest.raises(JobFailure) as caught:
        parse_job(raw)
    return caught.value.code


def test_a_minimal_job_gets_defaults() -> None:
    job = parse_job(body())
    assert job.image == InlineImage(data=b"hi")
    assert (job.params.conf, job.params.iou, job.params.max_det, job.params.imgsz) == (0.25, 0.7, 300, None)
    assert job.schema_version == 1


def test_image_kind_may_be_left_out_for_urls() -> None:
    assert parse_job(body(image={"url": "https://example.org/a.png"})).image == UrlImage(
        url="https://example.org/a.png"
    )


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", ErrorCode.INVALID_JSON),
        (b"\xff\xfe", ErrorCode.INVALID_JSON),
        (b"[1, 2]", ErrorCode.INVALID_JOB),
        (body(job_id=""), ErrorCode.INVALID_JOB),
        (body(model="Not A Model"), ErrorCode.INVALID_JOB),
        (body(extra_field=1), ErrorCode.INVALID_JOB),
        (body(image={"kind": "zip"}), ErrorCode.INVALID_JOB),
        (body(image={"url": "ftp://example.org/a.png"}), ErrorCode.INVALID_JOB),
        (body(schema_version=2), ErrorCode.UNSUPPORTED_SCHEMA),
        (json.dumps({"job_id": "j", "model": "shapes"}).encode(), ErrorCode.MISSING_IMAGE),
        (body(image={"data": "not base64!"}), ErrorCode.BAD_BASE64),
        (body(image={"data": "aGk"}), ErrorCode.BAD_BASE64),  # padding is required
        (body(image={"data": "aGk!"}), ErrorCode.BAD_BASE64),
        (body(image={"data": "aG-_"}), ErrorCode.BAD_BASE64),  # the URL-safe alphabet is not standard
        (body(image={"data": "aGk=\n"}), ErrorCode.BAD_BASE64),
        (body(image={"data": 5}), ErrorCode.INVALID_JOB),
        (b'{"job_id": "j1"} and more', ErrorCode.INVALID_JSON),
        (body(params={"conf": 1.5}), ErrorCode.INVALID_PARAMS),
        (body(params={"max_det": 0}), ErrorCode.INVALID_PARAMS),
        (body(params={"imgsz": 100000}), ErrorCode.INVALID_PARAMS),
        (body(params={"confidence": 0.5}), ErrorCode.INVALID_PARAMS),
        (body(deadline="2026-01-01T00:00:00"), ErrorCode.INVALID_JOB),  # no time zone
    ],
)
def test_malformed_bodies_get_specific_codes(raw: bytes, code: ErrorCode) -> None:
    assert code_of(raw) is code


def test_malformed_job_keeps_its_job_id_for_the_answer() -> None:
    with pytest.raises(JobFailure) as caught:
        parse_job(body(job_id="keep-me", params={"conf": -1}))
    assert caught.value.job_id == "keep-me"


def test_python_callers_may_give_base64_text_or_bytes() -> None:
    assert InlineImage(data="aGk=") == InlineImage(data=b"hi")
    with pytest.raises(ValueError, match="base64"):
        InlineImage(data="aGk")


def test_inline_images_round_trip_as_standard_base64() -> None:
    raw = bytes(range(256))
    job = Job(job_id="x", model="shapes", image=InlineImage(data=raw), submitted_at=datetime.now(UTC))
    wire = json.loads(job.model_dump_json())
    assert wire["image"]["data"] == base64.b64encode(raw).decode()
    assert parse_job(job.model_dump_json().encode()) == job


def test_a_result_has_an_error_exactly_when_it_failed() -> None:
    with pytest.raises(ValueError):
        JobResult(job_id="x", status="error", worker_id="w")
    with pytest.raises(ValueError):
        JobResult(job_id="x", status="ok", worker_id="w", error=JobError(code=ErrorCode.EXPIRED, message="m"))


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "http://" + "a" * 300 + "/a.png",
        "file:///data/a\x00b.png",
        "file:///data/a%00b.png",
        "http://bücher.example/a.png",
        "http://ｅxample.com/a.png",
        "http://user:pass@example.com/a.png",
        "http://example.com:99999/a.png",
        "http://example.com:0/a.png",
        "http://127.1/a.png",
        "http://example.com\t/a.png",
        "http:///a.png",
        "file://server/share/a.png",
    ],
)
def test_urls_no_worker_could_fetch_are_invalid_jobs(url: str) -> None:
    raw = json.dumps({"job_id": "j1", "model": "shapes", "image": {"url": url}}).encode()
    with pytest.raises(JobFailure) as caught:
        parse_job(raw)
    assert caught.value.code is ErrorCode.INVALID_JOB
    assert caught.value.message.startswith("image.url.url: ")


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.com/a.png?size=large#x",
        "http://xn--bcher-kva.example:8080/a.png",
        "http://10.1.2.3/a.png",  # well formed: whether it may be fetched is the worker's policy
        "http://[2001:db8::1]:8443/a.png",
        "file:///data/an image.png",
        "file://localhost/data/a.png",
    ],
)
def test_well_formed_urls_parse(url: str) -> None:
    assert parse_job(body(image={"url": url})).image == UrlImage(url=url)
