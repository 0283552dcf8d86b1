"""Structured logs: JSON lines whose fields follow one job and one update across workers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from control.client import Client
from control.operator import Operator
from schemas.control import Update
from worker.config import WorkerSettings
from worker.logs import TEXT_FORMAT, JsonFormatter, context_fields, log_context

if TYPE_CHECKING:
    from conftest import StartWorker


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing JSON lines into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter({"worker_id": "w1"}))
    logger = logging.getLogger("test_logs.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_json_line_carries_the_context_the_call_and_the_traceback(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured
    with log_context(job_id="j1", version="1.0.0", seq=None):
        logger.info("job %s", "j1")
        # A field of the call wins over the context's: a freed version is not the one asked for.
        logger.info("freed", extra={"version": "0.9.0", "path": Path("/tmp/x")})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("failed")
    logger.info("after")
    with log_context(message="not mine", level="nope", logger="other", time="never"):
        logger.warning("mine")
    first, freed, failed, after, core = lines(buffer)
    assert first["message"] == "job j1" and first["level"] == "INFO" and first["logger"] == "test_logs.captured"
    assert (first["worker_id"], first["job_id"], first["version"]) == ("w1", "j1", "1.0.0")
    assert "seq" not in first  # None: left out
    assert freed["version"] == "0.9.0" and freed["path"] == "/tmp/x"
    assert "ValueError: boom\nsecond line" in failed["exception"] and failed["job_id"] == "j1"
    assert "job_id" not in after and "version" not in after, "the context ends with its block"
    assert (core["message"], core["level"], core["logger"]) == ("mine", "WARNING", "test_logs.captured"), \
        "fields never take over the core keys"
    assert core["time"] != "never"
    assert first["time"].endswith("+00:00")


async def test_each_task_keeps_its_own_job_in_its_lines(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = captured

    async def job(job_id: str, pause_s: float) -> None:
        with log_context(job_id=job_id):
            await asyncio.sleep(pause_s)  # the other job logs meanwhile
            logger.info("answered %s", job_id)

    await asyncio.gather(job("a", 0.05), job("b", 0.0))
    assert {(e["message"], e["job_id"]) for e in lines(buffer)} == {("answered a", "a"), ("answered b", "b")}
    assert context_fields() == {}


def test_text_logs_are_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().log_format == "text"
    assert "%(message)s" in TEXT_FORMAT and not TEXT_FORMAT.startswith("{")
    monkeypatch.setenv("HOTSWAP_LOG_FORMAT", "json")
    assert WorkerSettings().log_format == "json"
    monkeypatch.setenv("HOTSWAP_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        WorkerSettings()


def json_log(path: Path) -> list[dict[str, Any]]:
    """Every line of a worker's log, each of which must be one JSON object."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{path.name}:{number} is not JSON: {line!r}") from exc
    return entries


@pytest.mark.slow
async def test_one_update_and_one_job_are_followed_through_the_json_logs_of_two_workers(
    start_worker: StartWorker, operator: Operator, client: Client
) -> None:
    json_logs = {"HOTSWAP_LOG_FORMAT": "json"}
    workers = {name: start_worker("shapes@1.0.0", name=name, env=json_logs) for name in ("a", "b")}
    report = await operator.publish_and_wait("shapes", Update(version="2.0.0"))
    assert report.ok and set(report.workers) == {"a", "b"}, (report.missing, report.failures)
    failed = await client.submit(b"not an image", model="shapes")
    assert failed.error is not None and failed.worker_id in workers
    command_id = report.command.command_id

    for name, worker in workers.items():
        entries = json_log(worker.log_path)
        assert {e.get("worker_id") for e in entries} == {name}
        update = [e for e in entries if e.get("command_id") == command_id]
        phases = [(e["phase"], e["version"]) for e in update if "phase" in e]
        assert phases == [(p, "2.0.0") for p in ("received", "preload", "validate", "swap", "done")], phases
        # The runtime's own lines carry the command too: the context reaches the model manager.
        ready = [e for e in update if e["logger"] == "worker.runtime.manager"]
        assert [(e["message"].split(" (")[0], e["version"], e["seq"]) for e in ready] == [
            ("shapes/2.0.0 ready", "2.0.0", report.command.seq)]
        answered = [e for e in entries if e.get("job_id") == failed.job_id]
        if name == failed.worker_id:
            assert [(e["code"], e["model"], e["attempt"]) for e in answered] == [("not_an_image", "shapes", 1)]
        else:
            assert answered == []
