"""`hotswap loadtest fleet-bounds`: the bounds computed from figures (pure), and the quick run
against the real broker, end to end through the command line: every step ran, every figure is
positive and the structure complete. No throughput is asserted beyond "more than nothing"."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from control.cli import app
from loadtest.fleet_bounds import Assumptions, Measured, all_bounds
from loadtest.fleet_plane import ReplayResult, envelope_sizes, new_signer, stream_disk_bytes
from loadtest.fleet_queue import LoopResult, lanes_for

LOOP = LoopResult(kind="quorum", replicas=1, body_bytes=1000, in_flight=64, jobs=2000, seconds=2.0, p50_ms=60.0,
                  client_cores=0.5, broker_cores=0.5)


def test_envelopes_are_real_signed_messages_of_a_few_hundred_bytes() -> None:
    sizes = envelope_sizes(new_signer())
    assert {"command: update (repository)", "progress event", "heartbeat, no artifacts"} <= sizes.keys()
    assert all(200 < size < 1000 for name, size in sizes.items() if "64 artifacts" not in name)
    # 64 sha256s of 64 hex digits and their quotes: what a heartbeat announcing its artifacts costs.
    assert sizes["heartbeat, 64 artifacts"] - sizes["heartbeat, no artifacts"] > 64 * 66


def test_bounds_compute_from_the_figures_and_say_which_are_measured() -> None:
    big = LoopResult(**{**LOOP.__dict__, "body_bytes": 1_000_000, "jobs": 200})
    measured = Measured(loops=[LOOP, big], envelopes=envelope_sizes(new_signer()),
                        replay=ReplayResult(entries=1000, replay_s=0.5, disk_bytes=700_000, markers=100,
                                            marker_disk_bytes=30_000))
    bounds = {b.figure: b for b in all_bounds(measured, Assumptions(worker_jobs_s=100.0, workers=1000))}
    assert bounds["workers one queue feeds"].value == pytest.approx(10.0)
    assert bounds["workers one queue feeds"].how == "computed"
    assert bounds["one quorum queue, 1 KB jobs"].how == "measured"
    assert bounds["workers it feeds, 1 MB images"].value == pytest.approx(1.0)
    # Each update is its command and the marker the operator leaves reading the log first.
    assert bounds["a year at 10 updates/day"].value == pytest.approx((700 + 300) * 10 * 365 / 1e6)
    assert bounds["log growth from 1000 workers starting once a day"].value == pytest.approx(300 * 1000 * 365 / 1e6)
    assert bounds["replay at start-up after a year at 10/day"].value == pytest.approx(500e-6 * 3650)
    assert bounds["heartbeat deliveries (every worker's event queue binds #)"].value == pytest.approx(500 * 1000)


def test_large_bodies_get_fewer_lanes_and_a_missing_stream_no_size(tmp_path: Path) -> None:
    assert lanes_for(1000) == 64
    assert lanes_for(4_000_000) == 8
    assert lanes_for(1_000_000_000) == 2
    assert stream_disk_bytes(tmp_path, "hotswap.control.log") is None


@pytest.mark.slow
def test_quick_run_measures_every_step_against_the_broker(amqp_url: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["loadtest", "fleet-bounds", "--quick", "--out", str(tmp_path),
                                      "--amqp-url", amqp_url])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "fleet.json").read_text())
    assert doc["errors"] == [] and doc["quick"] is True
    assert {(r["kind"], r["body_bytes"]) for r in doc["loops"]} >= {("classic", 1000), ("quorum", 1000),
                                                                     ("quorum", 1_000_000)}
    assert all(r["jobs_per_s"] > 0 and r["mb_per_s"] > 0 and r["p50_ms"] > 0 for r in doc["loops"])
    assert doc["replay"]["entries"] == doc["plan"]["replay_entries"] and doc["replay"]["replay_s"] > 0
    assert doc["replay"]["markers"] > 0
    assert doc["fanout"]["delivered"] > 0
    assert all(size > 0 for size in doc["envelopes"].values())
    bounds = {b["figure"]: b for b in doc["bounds"]}
    assert bounds["workers one queue feeds"]["value"] > 0
    assert all(b["value"] is None or b["value"] > 0 for b in doc["bounds"])
    if _broker_cli_answers():  # memory_breakdown needs the broker's CLI on this host
        assert doc["memory"] is not None and bounds["broker memory for 1000 workers"]["value"] > 0
    assert "one queue" in result.output and "bounds" in result.output


def _broker_cli_answers() -> bool:
    try:
        return subprocess.run(["rabbitmq-diagnostics", "ping"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
