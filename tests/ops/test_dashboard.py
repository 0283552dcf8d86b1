"""The provisioned Grafana dashboard (ops/grafana), without Grafana: its files agree with each
other and with the worker's metrics, and every PromQL expression in it (panels, annotations,
variables) runs on a real Prometheus scraping two real workers, and returns data."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from test_prometheus import (
    WINDOW,
    Observed,
    PrometheusError,
    check_everything_prometheus_saw,
    check_exposition,
    exposed_names,
    observe,
)

from control.client import Client
from control.operator import Operator
from worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from conftest import DeadLetters, HeldOut, StartLoad, StartWorker

GRAFANA = Path(__file__).resolve().parents[2] / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "hotswap.json"
#: What rabbitmq_prometheus exports per queue at /metrics/detailed?family=queue_coarse_metrics.
BROKER_METRICS = {"rabbitmq_detailed_queue_messages", "rabbitmq_detailed_queue_messages_ready",
                  "rabbitmq_detailed_queue_messages_unacked"}
#: What the issue asks the dashboard to show: each must be a panel's title (lowercase, in part).
REQUIRED_PANELS = ("throughput", "latency by phase", "traffic per version", "versions held", "errors by code",
                   "queue depth", "memory released at cleanup", "dead letters")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but rows, nested ones included."""
    for panel in board["panels"]:
        yield from panel.get("panels", [])
        if panel["type"] != "row":
            yield panel


def annotation_queries(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in board["annotations"]["list"] if not a.get("builtIn")]


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for each panel target and each annotation query."""
    found = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(board) for t in p["targets"]]
    return found + [(f"annotation {a['name']!r}", a["expr"]) for a in annotation_queries(board)]


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: the workers', the broker's, and Prometheus's own `up`."""
    return set(re.findall(r"\b((?:hotswap|rabbitmq)_[a-z_]+\b|up(?=\{))", expr))


def provisioned_uid() -> str:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


def test_every_query_uses_the_provisioned_datasource() -> None:
    board, uid = dashboard(), provisioned_uid()
    users = [*panels(board), *(t for p in panels(board) for t in p["targets"]), *annotation_queries(board),
             *board["templating"]["list"]]
    wrong = [u.get("title") or u.get("name") or u.get("refId") for u in users
             if u["datasource"] != {"type": "prometheus", "uid": uid}]
    assert users and not wrong, f"not on the provisioned datasource {uid!r}: {wrong}"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "hotswap.yml").read_text())
    assert [p["type"] for p in provider["providers"]] == ["file"]


def test_the_dashboard_shows_what_the_issue_asks_for_from_metrics_that_exist() -> None:
    board = dashboard()
    titles = [p["title"].lower() for p in panels(board)]
    assert [need for need in REQUIRED_PANELS if not any(need in t for t in titles)] == []
    assert {a["name"] for a in annotation_queries(board)} >= {"Updates", "Update phases"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    samples = {f"{name}{suffix}" for name in exposed_names(WorkerMetrics()) for suffix in ("", "_bucket", "_sum",
                                                                                         "_count")}
    for where, expr in expressions(board):
        names = metric_names(expr)
        assert names, f"{where}: names no metric: {expr}"
        unknown = names - samples - BROKER_METRICS - {"up"}
        assert not unknown, f"{where}: unknown metrics {unknown}"


def substituted(expr: str, board: dict[str, Any]) -> str:
    """What Grafana sends for the default view: $__rate_interval as 4 scrapes or more, each
    variable as its 'All' value."""
    expr = expr.replace("$__rate_interval", WINDOW)
    for variable in board["templating"]["list"]:
        expr = expr.replace(f"${variable['name']}", variable["allValue"])
    assert "$" not in expr, f"a variable Grafana would substitute is unknown here: {expr}"
    return expr


async def check_variables(o: Observed, board: dict[str, Any]) -> None:
    for variable in board["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert found, variable["query"]
        values = await o.prometheus.api(f"label/{found.group(2)}/values", **{"match[]": found.group(1)})
        assert "shapes" in values, f"variable {variable['name']}: {values}"


async def check_expressions(o: Observed, board: dict[str, Any]) -> None:
    failures = []
    for where, expr in expressions(board):
        try:
            series = await o.prometheus.query_range(substituted(expr, board), o.started, o.ended)
        except PrometheusError as exc:
            failures.append(f"{where}: {exc}")
            continue
        broker_only = metric_names(expr) <= BROKER_METRICS
        if broker_only and not o.broker_scraped:
            continue  # parsed; no broker exporter here to return data (rabbitmq_prometheus disabled)
        if not any(math.isfinite(float(v)) for s in series for _, v in s["values"]):
            failures.append(f"{where}: no data: {expr}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
async def test_prometheus_scrapes_two_workers_and_every_dashboard_query_returns_data(
    start_worker: StartWorker, operator: Operator, client: Client, load: StartLoad, heldout: list[HeldOut],
    amqp_url: str, namespace: str, tmp_path: Path, dead_letters: DeadLetters,
) -> None:
    """A real Prometheus over two running workers (test_prometheus.observe): what a dashboard needs
    is there (test_prometheus's checks), and so is what this dashboard asks."""
    board = dashboard()
    async with observe(start_worker, operator, client, load, heldout, amqp_url, namespace,
                       tmp_path / "prometheus", dead_letters) as observed:
        for check in check_everything_prometheus_saw():
            await check(observed)
        check_exposition(observed)
        await check_variables(observed, board)
        await check_expressions(observed, board)
