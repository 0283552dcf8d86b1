"""`hotswap` as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from control.contracts import SCHEMA_DIR
from schemas.signing import KeyFiles

if TYPE_CHECKING:
    from conftest import HeldOut, StartWorker


def hotswap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )


@pytest.mark.slow
def test_submit_prints_tables_json_and_annotated_images(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut], tmp_path: Path
) -> None:
    start_worker("shapes@2.0.0")
    env = {"HOTSWAP_AMQP_URL": amqp_url, "HOTSWAP_NAMESPACE": namespace}
    images = [str(h.path) for h in heldout[:3]]

    table = hotswap("submit", *images, "--model", "shapes", "--annotate", str(tmp_path), env=env)
    assert table.returncode == 0, table.stderr
    assert "shapes/2.0.0" in table.stdout and "score" in table.stdout
    assert len(list(tmp_path.glob("*.annotated.png"))) == 3

    as_json = hotswap("submit", *images, "--model", "shapes", "--json", env=env)
    results = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["status"] for r in results] == ["ok"] * 3
    assert {d["class_name"] for r in results for d in r["detections"]} <= {"circle", "square", "triangle"}

    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    failed = hotswap("submit", str(not_image), "--model", "shapes", "--json", env=env)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["code"] == "not_an_image"


def test_schema_command_prints_what_is_published() -> None:
    printed = hotswap("schema")
    assert printed.returncode == 0
    documents = json.loads(printed.stdout)
    assert documents["job"] == json.loads((SCHEMA_DIR / "job.schema.json").read_text())


def test_worker_without_a_model_is_a_usage_error() -> None:
    result = hotswap("worker")
    assert result.returncode == 2 and "--model" in result.stderr


@pytest.mark.slow
def test_operator_commands_wait_report_and_fail_loudly(
    start_worker: StartWorker, namespace: str, amqp_url: str, control_keys: KeyFiles
) -> None:
    start_worker("shapes@1.0.0", name="cli-a")
    env = {"HOTSWAP_AMQP_URL": amqp_url, "HOTSWAP_NAMESPACE": namespace,
           "HOTSWAP_CONTROL_KEY": str(control_keys.control_key),
           "HOTSWAP_WORKER_PUBLIC_KEY": str(control_keys.worker_public)}

    updated = hotswap("update", "shapes", "2.0.0", "--wait", "--json", env=env)
    assert updated.returncode == 0, updated.stdout + updated.stderr
    report = json.loads(updated.stdout)
    assert report["ok"] and [e["phase"] for e in report["workers"]["cli-a"]][-1] == "done"

    bad = hotswap("update", "shapes", "0.9.0-bad", "--wait", env=env)
    assert bad.returncode == 1 and "calibration recall" in bad.stdout

    split = hotswap("traffic", "shapes", "2.0.0=80", "1.0.0=20", "--shadow", "1.0.0:10", "--wait", env=env)
    assert split.returncode == 0, split.stdout
    status = json.loads(hotswap("status", "--json", "--listen", "1.5", env=env).stdout)
    versions = status["cli-a"]["models"]["shapes"]["versions"]
    assert (versions["2.0.0"]["weight"], versions["1.0.0"]["weight"]) == (80, 20)
    assert versions["0.9.0-bad"]["state"] == "failed"
    table = hotswap("status", "--listen", "1.5", env=env)
    assert "cli-a" in table.stdout and "2.0.0" in table.stdout

    rolled = hotswap("rollback", "shapes", "--to", "1.0.0", "--wait", env=env)
    assert rolled.returncode == 0 and "done" in rolled.stdout
    assert hotswap("update", "shapes", "2.0.0", env={**env, "HOTSWAP_CONTROL_KEY": "/nonexistent"}).returncode == 2
    no_worker_key = hotswap("status", env={**env, "HOTSWAP_WORKER_PUBLIC_KEY": "/nonexistent"})
    assert no_worker_key.returncode == 2 and "worker public key" in no_worker_key.stdout


def test_keys_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    assert hotswap("keys", "generate", "--out", str(tmp_path)).returncode == 0
    for private in ("control.key", "worker.key"):
        assert (tmp_path / private).stat().st_mode & 0o077 == 0
    assert (tmp_path / "worker.pub").is_file() and (tmp_path / "control.pub").is_file()
    assert hotswap("keys", "generate", "--out", str(tmp_path)).returncode == 1


def test_the_cli_and_submit_start_without_the_model_frameworks() -> None:
    """`hotswap --help` and `hotswap submit` load the client, never torch, ultralytics or OpenCV
    (0.70 s against 1.08 s for `--help` when they came in through the operator; median of 10 here)."""
    probe = ("import sys, control.cli, control.client, control.render; from control.cli import app; "
             "print(sorted(m for m in ('torch', 'ultralytics', 'cv2', 'modelscope') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
