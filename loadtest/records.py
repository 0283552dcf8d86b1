"""What the harness knows about each job it submitted, and exact accounting of the results.

The `Accountant` is told about every submitted job and every result message that arrives,
duplicates included, and counts:

* answered: jobs with at least one result (latency, version and worker come from the first);
* failed: jobs whose first result is an error (all codes, `expired` included), or that could
  not be published at all (`no_route`);
* expired: jobs whose first result is the error `expired`;
* lost: jobs with no result when the run ended (after its grace period);
* duplicated: jobs with more than one distinct result (at-least-once delivery made them run
  twice). A result message the broker re-sent to us after our connection dropped before our ack
  carries `redelivered` and the very same bytes: that is a transport copy, not a duplicate,
  and is counted apart (`redeliveries`).

No I/O here: the transport feeds it, the report reads it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from schemas.jobs import JobResult

Status = Literal["pending", "ok", "error", "lost"]
PUBLISH_FAILED = "no_route"  # the harness's own code: the broker had no queue for the model


@dataclass
class JobRecord:
    job_id: str
    image: str
    model: str
    submitted_at: float  # time.monotonic() just before publishing
    submitted_wall: float  # time.time() at the same moment
    answered_at: float | None = None  # monotonic, first result
    status: Status = "pending"
    error_code: str | None = None
    version: str | None = None
    worker_id: str | None = None
    latency_ms: float | None = None  # submit → first result, as the producer sees it
    attempt: int | None = None  # delivery attempt that produced the first result
    results: int = 0  # distinct results received; more than one is a duplicate
    redeliveries: int = 0  # transport copies of a result already counted

    @property
    def duplicates(self) -> int:
        return max(0, self.results - 1)

    def to_json(self, t0: float) -> dict[str, Any]:
        """As a JSON object, monotonic times made relative to `t0` (the start of the load)."""
        data = asdict(self)
        data["submitted_s"] = round(self.submitted_at - t0, 6)
        data["answered_s"] = None if self.answered_at is None else round(self.answered_at - t0, 6)
        del data["submitted_at"], data["answered_at"]
        return data


@dataclass(frozen=True)
class ControlEvent:
    """Something the scenario did to the system under load (marked on the plot)."""

    at: float  # monotonic
    label: str
    kind: Literal["control", "fault", "info"] = "control"
    ok: bool | None = None


@dataclass(frozen=True)
class Check:
    """A scenario's own verdict (an A/B share, an update's outcome), beside the accounting."""

    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class Counts:
    submitted: int
    answered: int
    ok: int
    failed: int
    expired: int
    lost: int
    pending: int
    duplicated: int  # jobs with more than one result
    duplicate_results: int  # results beyond each job's first
    redeliveries: int  # transport copies (same bytes, redelivered flag): not duplicates
    retried: int  # jobs whose first result came from a delivery attempt > 1
    unexpected: int  # results for job ids this run never submitted
    invalid: int  # result messages that are not a valid result

    @property
    def clean(self) -> bool:
        """Nothing lost, nothing failed: the gate."""
        return self.lost == 0 and self.failed == 0 and self.pending == 0


@dataclass
class Accountant:
    clock: Callable[[], float] = time.monotonic
    records: dict[str, JobRecord] = field(default_factory=dict)
    unexpected: int = 0
    invalid: int = 0
    finished: bool = False
    #: Called once per job, on its first result (the closed loop waits on this).
    on_answer: Callable[[JobRecord], None] | None = None
    _digests: dict[str, set[bytes]] = field(default_factory=dict)

    def submitted(self, job_id: str, image: str, model: str) -> JobRecord:
        if job_id in self.records:
            raise ValueError(f"job id {job_id!r} was already submitted in this run")
        record = JobRecord(job_id, image, model, self.clock(), time.time())
        self.records[job_id] = record
        return record

    def publish_failed(self, job_id: str, code: str = PUBLISH_FAILED) -> None:
        record = self.records[job_id]
        record.status, record.error_code = "error", code
        if self.on_answer is not None:
            self.on_answer(record)

    def received(self, correlation_id: str | None, body: bytes, redelivered: bool = False) -> None:
        """One result message as it came off the reply queue."""
        if self.finished:
            return
        at = self.clock()
        try:
            result = JobResult.model_validate_json(body)
        except ValidationError:
            self.invalid += 1
            return
        key = correlation_id or result.job_id
        record = self.records.get(key)
        if record is None:
            self.unexpected += 1
            return
        digest = hashlib.sha256(body).digest()
        seen = self._digests.setdefault(key, set())
        if redelivered and digest in seen:
            record.redeliveries += 1
            return
        seen.add(digest)
        record.results += 1
        if record.results > 1 or record.status != "pending":
            return
        record.answered_at = at
        record.latency_ms = (at - record.submitted_at) * 1000
        record.status = result.status
        record.error_code = result.error.code.value if result.error is not None else None
        record.version = result.version
        record.worker_id = result.worker_id
        record.attempt = result.attempt
        if self.on_answer is not None:
            self.on_answer(record)

    @property
    def pending(self) -> int:
        return sum(r.status == "pending" for r in self.records.values())

    def finish(self) -> Counts:
        """The run is over: whatever is still unanswered is lost."""
        for record in self.records.values():
            if record.status == "pending":
                record.status = "lost"
        self.finished = True
        return self.counts()

    def counts(self) -> Counts:
        records = list(self.records.values())
        return Counts(
            submitted=len(records),
            answered=sum(r.results > 0 for r in records),
            ok=sum(r.status == "ok" for r in records),
            failed=sum(r.status == "error" for r in records),
            expired=sum(r.error_code == "expired" for r in records),
            lost=sum(r.status == "lost" for r in records),
            pending=sum(r.status == "pending" for r in records),
            duplicated=sum(r.results > 1 for r in records),
            duplicate_results=sum(r.duplicates for r in records),
            redeliveries=sum(r.redeliveries for r in records),
            retried=sum((r.attempt or 1) > 1 for r in records),
            unexpected=self.unexpected,
            invalid=self.invalid,
        )
