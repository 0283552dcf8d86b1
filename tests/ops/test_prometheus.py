"""The shipped Prometheus config, alerts and README metrics table, checked with the real tools:
promtool on the files, and a real Prometheus server scraping two real workers while jobs flow,
a version is updated, an update fails and jobs are dead-lettered.

`observe` (the server and the scenario) is shared with test_dashboard.py, which checks the Grafana
dashboard's queries against the same kind of run."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import aio_pika
import aiohttp
import pytest
import yaml

from control.client import Client
from control.operator import Operator
from control.processes import WorkerProcess
from schemas.control import Shadow, Traffic, Update
from schemas.jobs import InlineImage, Job
from schemas.topology import Topology
from worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from conftest import DeadLetters, HeldOut, StartLoad, StartWorker

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops" / "prometheus"
WORKERS_JOB, BROKER_JOB = "hotswap-workers", "rabbitmq-queues"
#: The test server's scrape and rule interval; the rate windows below span several of them.
SCRAPE_S = 1
WINDOW = "10s"
UPDATE_PHASES = {"preload", "validate", "swap", "cleanup"}


def tool(name: str) -> str:
    """A Prometheus binary, or a failure that says how to get it (never a skip: CI must run these)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it as root where apt-get exists; "
                    "elsewhere install Prometheus (Debian: apt-get install prometheus)")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=120)


# --- the files, without a server -----------------------------------------------------------------

def test_the_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(OPS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(OPS / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in yaml.safe_load((OPS / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested_alerts = set(re.findall(r"alertname: (\w+)", (OPS / "alerts_test.yml").read_text()))
    assert alerts == tested_alerts, f"alerts without a unit test: {alerts - tested_alerts}"


def test_the_shipped_config_passes_promtool_check_config() -> None:
    checked = promtool("check", "config", str(OPS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def exposed_names(metrics: WorkerMetrics) -> set[str]:
    """Every metric a worker registers, as /metrics names it (counters with their _total)."""
    return {f"{m.name}_total" if m.type == "counter" else m.name for m in metrics.registry.collect()}


def readme_metrics() -> set[str]:
    text = (REPO / "README.md").read_text()
    table = re.search(r"<!-- metrics: checked by tests/ops/test_prometheus.py -->(.*?)<!-- end of metrics -->",
                      text, re.S)
    assert table, "README.md has no metrics table between its markers"
    return set(re.findall(r"^\| `(\w+)`", table.group(1), re.M))


def test_the_readme_table_names_every_metric_a_worker_registers() -> None:
    registered, documented = exposed_names(WorkerMetrics()), readme_metrics()
    assert registered - documented == set(), "metrics missing from the README table"
    assert documented - registered == set(), "README rows for metrics no worker registers"


# --- a real server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_exporter(amqp_url: str) -> str | None:
    """RabbitMQ's rabbitmq_prometheus endpoint (HOST:PORT): HOTSWAP_RABBITMQ_PROMETHEUS, else port
    15692 of the broker's host; None where nothing answers there (the plugin is not enabled)."""
    default = f"{urlparse(amqp_url).hostname or '127.0.0.1'}:15692"
    host, _, port = os.environ.get("HOTSWAP_RABBITMQ_PROMETHEUS", default).rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return None
    return f"{host}:{port}"


def adapted_config(workers: list[str], broker: str | None) -> dict[str, Any]:
    """The shipped config, for a test: its targets, a short interval, the rules by absolute path."""
    config: dict[str, Any] = yaml.safe_load((OPS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s",
                            evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str(OPS / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {WORKERS_JOB, BROKER_JOB}, "the alerts and dashboard name these jobs"
    jobs[WORKERS_JOB].pop("dns_sd_configs", None)  # the compose stack's discovery
    jobs[WORKERS_JOB]["static_configs"] = [{"targets": workers}]
    if broker is None:
        config["scrape_configs"].remove(jobs[BROKER_JOB])
    else:
        jobs[BROKER_JOB]["static_configs"] = [{"targets": [broker]}]
    return config


class PrometheusError(AssertionError):
    pass


class Prometheus:
    """A private Prometheus server (port, data dir) and its HTTP query API."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.command = [tool("prometheus"), f"--config.file={self.config_path}",
                        f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address={self.url[7:]}"]
        self.process: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, timeout_s: float = 60) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_path.read_text()[-3000:]}"
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(self.url + "/-/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
        raise PrometheusError(f"prometheus not ready in {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def api(self, path: str, **params: str) -> Any:
        """GET an API path; its `data`, or PrometheusError with the server's reason."""
        assert self.session is not None
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr, **({"time": str(at)} if at is not None else {}))
        return list(data["result"])

    async def query_range(self, expr: str, start: float, end: float, step: float = SCRAPE_S) -> list[dict[str, Any]]:
        data = await self.api("query_range", query=expr, start=str(start), end=str(end), step=str(step))
        return list(data["result"])

    async def wait_for_targets(self, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            active = (await self.api("targets"))["activeTargets"]
            if len(active) == count and all(t["health"] == "up" for t in active):
                return list(active)
            assert time.monotonic() < deadline, f"targets not all up: {active}"
            await asyncio.sleep(0.5)


def by(labels: str, result: list[dict[str, Any]]) -> dict[tuple[str, ...], float]:
    """An instant vector as {label values: value}."""
    keys = labels.split(",")
    return {tuple(s["metric"].get(k, "") for k in keys): float(s["value"][1]) for s in result}


# --- the scenario ----------------------------------------------------------------------------------

@dataclass
class Observed:
    """What a run did, for the checks to compare with what Prometheus saw."""

    prometheus: Prometheus
    workers: list[WorkerProcess]
    namespace: str
    broker_scraped: bool
    started: float = 0.0
    before_update: float = 0.0
    ended: float = 0.0
    answered_ok: int = 0
    answered_error: int = 0
    dead_lettered: int = 0
    failed_update: str = ""

    @property
    def instances(self) -> set[str]:
        return {w.url.removeprefix("http://") for w in self.workers}


async def bad_jobs(client: Client, observed: Observed, rounds: int) -> None:
    """Each round: one malformed message (answered, dead-lettered) and one non-image (answered).
    Spread over several scrapes, so that rate() and increase() see them grow."""
    for i in range(rounds):
        malformed = await client.submit_raw(b"not json", model="shapes", job_id=f"bad-{time.time_ns()}")
        not_an_image = await client.submit(b"not an image", model="shapes")
        assert malformed.status == not_an_image.status == "error"
        observed.answered_error += 2
        observed.dead_lettered += 1
        if i + 1 < rounds:
            await asyncio.sleep(SCRAPE_S * 1.5)


@contextlib.asynccontextmanager
async def refused_results(amqp_url: str, namespace: str, image: bytes) -> AsyncIterator[None]:
    """One job whose reply queue refuses its result: answered, unconfirmed and requeued until the
    broker dead-letters it (hotswap_results_unpublished_total, a dead letter at the broker)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        full = await channel.declare_queue(exclusive=True,
                                           arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        job = Job(job_id="refused", model="shapes", image=InlineImage(data=image))
        exchange = await channel.get_exchange(Topology(namespace).jobs_exchange)
        await exchange.publish(aio_pika.Message(job.model_dump_json().encode(), reply_to=full.name,
                                                correlation_id=job.job_id), routing_key="shapes")
        yield


@contextlib.asynccontextmanager
async def observe(
    start_worker: StartWorker, operator: Operator, client: Client, load: StartLoad, heldout: list[HeldOut],
    amqp_url: str, namespace: str, directory: Path, dead_letters: DeadLetters,
) -> AsyncIterator[Observed]:
    """Two workers scraped by a real Prometheus while jobs flow: bad jobs, a refused result, an
    update to 2.0.0, then 1.0.0 as its shadow, more bad jobs, an update that fails. Yields once
    the last scrape has it all."""
    # No standby: the update frees 1.0.0 (a cleanup, its memory released) and the shadow loads
    # it again. w1 runs one shadow at a time: under load some are dropped.
    env = {"HOTSWAP_KEEP_STANDBY": "0"}
    workers = [start_worker("shapes@1.0.0", name="w1", env={**env, "HOTSWAP_MAX_SHADOW_IN_FLIGHT": "1"}),
               start_worker("shapes@1.0.0", name="w2", env=env)]
    broker = broker_exporter(amqp_url)
    prometheus = Prometheus(directory, adapted_config([w.url.removeprefix("http://") for w in workers], broker))
    observed = Observed(prometheus, workers, namespace, broker is not None)
    await prometheus.start()
    try:
        await prometheus.wait_for_targets(len(workers) + (broker is not None))
        observed.started = time.time()
        running = load(concurrency=4)
        async with refused_results(amqp_url, namespace, heldout[0].path.read_bytes()):
            await running.wait_for(40)
            await bad_jobs(client, observed, rounds=3)
            observed.before_update = time.time()
            report = await operator.publish_and_wait("shapes", Update(version="2.0.0"))
            assert report.ok and set(report.workers) == {"w1", "w2"}, (report.workers, report.failures)
            shadowed = Traffic(weights={"2.0.0": 100}, shadow=Shadow(version="1.0.0", percent=100))
            assert (await operator.publish_and_wait("shapes", shadowed)).ok
            await running.wait_for(len(running.results) + 60)
            await bad_jobs(client, observed, rounds=3)
            failed = await operator.publish_and_wait("shapes", Update(version="9.9.9"))
            assert set(failed.failures) == {"w1", "w2"}, failed.failures
            observed.failed_update = next(iter(failed.failures.values()))
            await asyncio.sleep(SCRAPE_S * 3)  # the alerts see the failure, at an interval of 1 s
            results = await running.stop()
        observed.answered_ok = len(results)
        # The refused job is tried until the broker dead-letters it; a try that straddled the last
        # scrape would count as answered and not yet as unconfirmed. Its tries are over once it is
        # a dead letter beside the malformed jobs.
        async with await aio_pika.connect(amqp_url) as connection:
            await dead_letters(await connection.channel(), namespace, "shapes", observed.dead_lettered + 1, 60.0)
        await asyncio.sleep(SCRAPE_S * 3)  # a scrape after the last job, and a rule evaluation
        observed.ended = time.time()
        yield observed
    finally:
        await prometheus.stop()


# --- what Prometheus saw ---------------------------------------------------------------------------

async def check_targets(o: Observed) -> None:
    # Over a few scrapes: on a busy machine one scrape may miss its 1 s timeout.
    up = by("job,instance", await o.prometheus.query(f"max_over_time(up[{WINDOW}])"))
    assert {i for (job, i), v in up.items() if job == WORKERS_JOB and v == 1} == o.instances, up
    ready = by("instance", await o.prometheus.query(f"max_over_time(hotswap_worker_ready[{WINDOW}])"))
    assert ready == {(i,): 1.0 for i in o.instances}, ready


async def check_jobs_by_status_and_version(o: Observed) -> None:
    q = o.prometheus.query
    jobs = by("version,status", await q('sum by (version, status) (hotswap_jobs_total{model="shapes"})'))
    assert jobs.keys() >= {("1.0.0", "ok"), ("2.0.0", "ok")}, jobs
    # Every answer is counted once by the worker that gave it; the refused job's answers are the
    # results the broker did not confirm.
    unconfirmed = sum(by("model", await q("sum by (model) (hotswap_results_unpublished_total)")).values())
    assert unconfirmed >= 1, "the refused result was never counted"
    assert sum(v for (_, s), v in jobs.items() if s == "ok") == o.answered_ok + unconfirmed, jobs
    assert sum(v for (_, s), v in jobs.items() if s == "error") == o.answered_error, jobs
    codes = by("code", await q('sum by (code) (hotswap_jobs_total{status="error"})'))
    assert codes == {("invalid_json",): o.answered_error / 2, ("not_an_image",): o.answered_error / 2}, codes
    served = by("instance", await q('sum by (instance) (hotswap_jobs_total{status="ok"})'))
    assert set(i for (i,) in served) == o.instances, f"a worker answered nothing: {served}"


async def check_phase_quantiles(o: Observed) -> None:
    def quantile(q: float) -> str:
        return (f'histogram_quantile({q}, sum by (phase, le) '
                f'(rate(hotswap_job_phase_seconds_bucket{{model="shapes"}}[{WINDOW}])))')

    series = {}
    for q in (0.5, 0.99):
        found = await o.prometheus.query_range(quantile(q), o.started, o.ended)
        series[q] = {s["metric"]["phase"]: {t: float(v) for t, v in s["values"]} for s in found}
    assert set(series[0.99]) == {"queue_wait", "decode", "inference", "total"}, series[0.99].keys()
    for phase, p99 in series[0.99].items():
        finite = {t: v for t, v in p99.items() if math.isfinite(v)}
        assert finite and max(finite.values()) > 0, f"{phase}: no latency seen"
        assert all(series[0.5][phase][t] <= v for t, v in finite.items()), f"{phase}: p50 over p99"
    # Quantiles of different phases need not order (errors have a total and no inference), but
    # each job's total holds its inference: so do the sums.
    spent = by("phase", await o.prometheus.query('sum by (phase) (hotswap_job_phase_seconds_sum{model="shapes"})'))
    assert spent[("total",)] >= spent[("inference",)] + spent[("decode",)] > 0, spent


async def check_versions_and_traffic(o: Observed) -> None:
    q = o.prometheus
    weights = await q.query_range('max by (version) (hotswap_traffic_weight_percent{model="shapes"})',
                                  o.started, o.ended)
    over_time = {s["metric"]["version"]: [float(v) for _, v in s["values"]] for s in weights}
    assert over_time["1.0.0"][0] == 100 and over_time["2.0.0"][-1] == 100, over_time
    now = by("instance,version", await q.query('hotswap_traffic_weight_percent{model="shapes"}'))
    assert now == {(i, "2.0.0"): 100.0 for i in o.instances}, now
    states = by("instance,version,state", await q.query('hotswap_model_version_info{model="shapes"}'))
    for instance in o.instances:
        assert states[(instance, "2.0.0", "active")] == 1, states
        assert states[(instance, "1.0.0", "standby")] == 1, states


async def check_update_phases(o: Observed) -> None:
    q = o.prometheus.query
    counts = 'sum by (instance, phase) (hotswap_update_phase_seconds_count{model="shapes"})'
    before, after = by("instance,phase", await q(counts, o.before_update)), by("instance,phase", await q(counts))
    for instance in o.instances:
        grew = {p for p in UPDATE_PHASES if after.get((instance, p), 0) > before.get((instance, p), 0)}
        assert grew == UPDATE_PHASES, f"{instance}: phases seen {grew}"
    commands = by("instance,action,outcome", await q('hotswap_control_commands_total{model="shapes"}'))
    for instance in o.instances:
        assert commands[(instance, "update", "done")] == 1, commands
        assert commands[(instance, "update", "failed")] == 1, commands
        assert commands[(instance, "traffic", "done")] == 1, commands
    # The cleanup measured what it gave back (any sign: RSS may grow meanwhile).
    released = by("instance", await q('hotswap_cleanup_memory_released_bytes{model="shapes"}'))
    assert set(i for (i,) in released) == o.instances, released


async def check_dead_letters(o: Observed) -> None:
    dead = await o.prometheus.query('sum by (code) (hotswap_jobs_dead_lettered_total{model="shapes"})')
    assert by("code", dead).get(("invalid_json",)) == o.dead_lettered, dead


async def check_alerts(o: Observed) -> None:
    groups = (await o.prometheus.api("rules", type="alert"))["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(rules) == 6 and all(r["health"] == "ok" for r in rules.values()), rules
    alerts = by("alertname,instance,model,queue", await o.prometheus.query('ALERTS{alertstate="firing"}'))
    # A broker is shared: only this test's queues are its business.
    firing = {a for a in alerts if not a[3] or a[3].startswith(f"{o.namespace}.")}
    expected = {("HotswapUpdateFailed", i, "shapes", "") for i in o.instances}
    expected.add(("HotswapDeadLettersGrowing", "", "shapes", ""))
    if o.broker_scraped:  # the refused job, dead-lettered by the broker: its queue grew
        expected.add(("HotswapDeadLettersGrowing", "", "", Topology(o.namespace).dead_letter_queue("shapes")))
    assert set(firing) == expected, f"firing: {sorted(firing)}; the failed update said: {o.failed_update}"


def check_exposition(o: Observed) -> None:
    for worker in o.workers:
        checked = promtool("check", "metrics", stdin=worker.text("/metrics"))
        assert checked.returncode == 0, checked.stdout + checked.stderr


def check_everything_prometheus_saw() -> list[Callable[[Observed], Awaitable[None]]]:
    """The checks of what Prometheus saw over the run (`observe`); test_dashboard.py runs them with
    the dashboard's over the same run, so that the two workers and the update run once."""
    return [check_targets, check_jobs_by_status_and_version, check_phase_quantiles, check_versions_and_traffic,
            check_update_phases, check_dead_letters, check_alerts]
