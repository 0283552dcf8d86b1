"""The Kubernetes manifests (ops/k8s/), checked offline: core kinds against the Kubernetes OpenAPI
schemas that `kubernetes-validate` bundles (strict: unknown fields refused), KEDA's kinds against the
schemas in ops/k8s/schemas/ (hand-written from KEDA's CRD: no package ships them), and the relations
between them, the image, the CLI and the worker's settings."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from stack_support import (
    ROOT,
    accepted_envvars,
    check_hotswap,
    exec_form,
    final_stage,
    hotswap_argv,
    image_uid,
    last,
    parse_dockerfile,
    parse_settings,
)

from schemas.topology import Topology
from worker.config import WorkerSettings
from worker.connections import resolve_url

K8S = ROOT / "ops" / "k8s"
#: The oldest Kubernetes the manifests are written for, and the newest whose schemas are bundled.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
#: Secrets made outside the manifests, with the keys they must hold (worker.yaml says how).
EXTERNAL_SECRETS = {"hotswap-worker-keys": {"control.pub", "worker.key"}}
#: Time a worker needs after its grace period: stop the control loop, close the connection.
SHUTDOWN_MARGIN_S = 10.0
IMAGE = final_stage(parse_dockerfile())
DEFINITIONS: dict[str, Any] = json.loads((ROOT / "ops" / "rabbitmq" / "definitions.json").read_text())


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = load_manifests()


def ids(manifests: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in manifests]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in MANIFESTS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in ops/k8s"
    return found[0]


def pod_specs() -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for _, d in MANIFESTS if d["kind"] in ("Deployment", "Job")]


def container_argv(container: dict[str, Any]) -> list[str]:
    """Kubernetes' rule: `command` replaces ENTRYPOINT (and drops CMD); `args` replaces CMD."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*exec_form(last(IMAGE, "ENTRYPOINT")), *container.get("args", exec_form(last(IMAGE, "CMD")))]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: envFrom (ConfigMaps, Secrets) first, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= one("ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            env |= one("Secret", source["secretRef"]["name"])["stringData"]
    return env | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def worker() -> tuple[dict[str, Any], dict[str, Any], WorkerSettings]:
    """The worker Deployment, its container and the settings that container starts with."""
    deployment = one("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container, parse_settings(container_env(container))


def password_file(container: dict[str, Any]) -> PurePosixPath:
    named = container_env(container).get("HOTSWAP_AMQP_PASSWORD_FILE")
    assert named, "the worker's broker password comes from no file (HOTSWAP_AMQP_PASSWORD_FILE)"
    return PurePosixPath(named)


def mount_of(pod: dict[str, Any], container: dict[str, Any], path: PurePosixPath) -> dict[str, Any]:
    """The volume whose mount holds `path`."""
    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume: dict[str, Any] = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume | {"mount": mount}


# --- schemas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), [m for m in MANIFESTS if m[1]["kind"] not in KEDA_KINDS],
                         ids=ids([m for m in MANIFESTS if m[1]["kind"] not in KEDA_KINDS]))
def test_core_manifest_follows_the_kubernetes_schema(name: str, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {doc['kind']} on Kubernetes {version}: {exc.caught}")


def keda_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((K8S / "schemas" / f"{kind.lower()}-keda-v1alpha1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize(("name", "doc"), [m for m in MANIFESTS if m[1]["kind"] in KEDA_KINDS],
                         ids=ids([m for m in MANIFESTS if m[1]["kind"] in KEDA_KINDS]))
def test_keda_manifest_follows_its_schema(name: str, doc: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(keda_schema(doc["kind"]))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, f"{name}: {errors}"


def test_every_kind_is_validated() -> None:
    kinds = {d["kind"] for _, d in MANIFESTS}
    assert {"Deployment", "ConfigMap", "Secret", "ScaledObject", "TriggerAuthentication"} <= kinds
    assert {d["apiVersion"] for _, d in MANIFESTS if d["kind"] in KEDA_KINDS} == {"keda.sh/v1alpha1"}


# --- the workers ------------------------------------------------------------------------------------


def test_containers_run_real_hotswap_commands() -> None:
    for pod in pod_specs():
        for container in pod["containers"]:
            commands = hotswap_argv(container_argv(container))
            assert commands, f"{container['name']} runs {container_argv(container)}: no hotswap command"
            for args in commands:
                check_hotswap(args)


def test_settings_are_read_by_the_worker() -> None:
    """Every variable the ConfigMap, the Secret and env give the worker is a real setting or option."""
    _, container, _ = worker()
    command = check_hotswap(hotswap_argv(container_argv(container))[0])
    assert command.path == ("worker",)
    unknown = sorted(set(container_env(container)) - accepted_envvars(command))
    assert not unknown, f"not read by the worker: {unknown}"


def test_probes_ask_healthz_and_readyz_on_the_status_port() -> None:
    _, container, settings = worker()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path, f"{probe} asks {http['path']}"
        assert ports.get(http["port"], http["port"]) == settings.status_port, f"{probe} port {http['port']}"
    assert settings.status_host == "0.0.0.0", "the kubelet's probes come from off the pod's loopback"


def test_pods_outlast_the_worker_grace_period() -> None:
    """Kubernetes sends SIGKILL terminationGracePeriodSeconds after SIGTERM (30 unless set): it
    must outlast HOTSWAP_GRACE_PERIOD_S, in which the worker finishes and acks its jobs."""
    deployment, _, settings = worker()
    period = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert period >= settings.grace_period_s + SHUTDOWN_MARGIN_S, (
        f"terminationGracePeriodSeconds {period}, HOTSWAP_GRACE_PERIOD_S {settings.grace_period_s:g}")


def test_pods_run_as_the_image_user() -> None:
    for pod in pod_specs():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == image_uid(IMAGE), "not the Dockerfile's USER"


def test_the_worker_writes_only_to_its_volumes() -> None:
    """The root filesystem is read-only: the artifact cache and HOME (ultralytics' and modelscope's
    caches) must lie on writable volumes, the model repository and the keys on read-only ones."""
    deployment, container, settings = worker()
    pod = deployment["spec"]["template"]["spec"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for path in (settings.artifact_cache, Path("/home/hotswap"), Path("/tmp")):
        volume = mount_of(pod, container, PurePosixPath(path))
        assert "emptyDir" in volume and not volume["mount"].get("readOnly"), f"{path} is not writable"
    for read_only in (settings.model_root, settings.control_public_key, settings.worker_key_path,
                      password_file(container)):
        assert read_only is not None
        assert mount_of(pod, container, PurePosixPath(read_only))["mount"].get("readOnly"), f"{read_only} is writable"


def test_references_resolve() -> None:
    """ConfigMaps, Secrets and claims the pods name exist here; the key Secret made by kubectl holds
    the files the settings name, and never the operator's control.key."""
    deployment, container, settings = worker()
    for _, doc in MANIFESTS:
        if doc["kind"] in ("Deployment", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                container_env(c)  # `one` fails on a missing ConfigMap or Secret
            for volume in doc["spec"]["template"]["spec"]["volumes"]:
                if "persistentVolumeClaim" in volume:
                    one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    pod = deployment["spec"]["template"]["spec"]
    for path in (settings.control_public_key, settings.worker_key_path):
        assert path is not None
        secret = mount_of(pod, container, PurePosixPath(path))["secret"]["secretName"]
        assert path.name in EXTERNAL_SECRETS[secret], f"{path.name} is not in the Secret {secret}"
    assert "control.key" not in set().union(*EXTERNAL_SECRETS.values())
    password = password_file(container)
    secret = mount_of(pod, container, password)["secret"]["secretName"]
    assert password.name in one("Secret", secret)["stringData"], f"{password.name} is not in the Secret {secret}"


def test_zoo_job_fills_the_repository_the_workers_read() -> None:
    job = one("Job")["spec"]["template"]["spec"]
    (builder,) = job["containers"]
    args = hotswap_argv(container_argv(builder))[0]
    root = PurePosixPath(args[args.index("--root") + 1])
    claim = mount_of(job, builder, root)["persistentVolumeClaim"]["claimName"]
    deployment, container, settings = worker()
    served = mount_of(deployment["spec"]["template"]["spec"], container, PurePosixPath(settings.model_root))
    assert served["persistentVolumeClaim"]["claimName"] == claim
    assert "ReadWriteMany" in one("PersistentVolumeClaim", claim)["spec"]["accessModes"]


# --- scaling ----------------------------------------------------------------------------------------


def test_keda_scales_the_worker_on_its_model_queue() -> None:
    deployment, container, settings = worker()
    scaled = one("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count; `kubectl apply` would reset it"
    assert scaled["minReplicaCount"] >= 1, "a cold worker replays the control log and loads before it serves"
    (args,) = hotswap_argv(container_argv(container))
    models = [args[i + 1].split("@")[0] for i, a in enumerate(args) if a in ("--model", "-m")]
    queues = {Topology(settings.namespace).job_queue(model) for model in models}
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert {trigger["metadata"]["queueName"]} == queues, f"the worker consumes {sorted(queues)}"


def keda_broker_url() -> str:
    """The URL KEDA's trigger connects with: the `host` of its TriggerAuthentication's Secret."""
    (trigger,) = one("ScaledObject")["spec"]["triggers"]
    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
    (host,) = [ref for ref in auth["secretTargetRef"] if ref["parameter"] == "host"]
    url: str = one("Secret", host["name"])["stringData"][host["key"]]
    return url


# --- the broker's users -------------------------------------------------------------------------------


def vhost_of(url: SplitResult) -> str:
    return unquote(url.path[1:]) or "/"


def grants(user: str, vhost: str) -> dict[str, str]:
    """The user's permissions in the vhost, as ops/rabbitmq/definitions.json gives them."""
    assert user in {u["name"] for u in DEFINITIONS["users"]}, f"{user} is not a user of definitions.json"
    assert vhost in {v["name"] for v in DEFINITIONS["vhosts"]}, f"vhost {vhost!r} is not in definitions.json"
    granted = [p for p in DEFINITIONS["permissions"] if p["user"] == user and p["vhost"] == vhost]
    assert len(granted) == 1, f"{user} has no permissions in the vhost {vhost!r}: the broker refuses it the vhost"
    return {k: granted[0][k] for k in ("configure", "write", "read")}


def test_the_worker_connects_as_the_definitions_worker_user_in_their_vhost() -> None:
    """Importing definitions at boot creates no guest (and a production broker should have none):
    the URL must name a user and vhost of ops/rabbitmq/definitions.json, one allowed what a worker
    does. RabbitMQ matches permission regexes unanchored, as re.search does."""
    _, container, settings = worker()
    url = urlsplit(settings.amqp_url)
    assert url.username, "no user in HOTSWAP_AMQP_URL"
    assert url.password is None, "the password belongs in the Secret (HOTSWAP_AMQP_PASSWORD_FILE), not the URL"
    granted = grants(url.username, vhost_of(url))
    topology = Topology(settings.namespace)
    (args,) = hotswap_argv(container_argv(container))
    for model in [args[i + 1].split("@")[0] for i, a in enumerate(args) if a in ("--model", "-m")]:
        for verb, name in (("configure", topology.job_queue(model)), ("read", topology.job_queue(model)),
                           ("read", topology.control_log), ("write", topology.status_exchange),
                           ("write", "amq.default")):
            assert re.search(granted[verb], name), f"{url.username} may not {verb} {name}"


def test_the_worker_reads_its_broker_password_from_the_mounted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOTSWAP_AMQP_PASSWORD_FILE as worker.yaml sets it: the worker's resolve_url puts the file's
    content (a Secret's, without its trailing newline) in the URL."""
    _, container, settings = worker()
    assert password_file(container).parent.name == "amqp"
    secret = tmp_path / password_file(container).name
    secret.write_text("from-the-secret\n")
    monkeypatch.setenv("HOTSWAP_AMQP_PASSWORD_FILE", str(secret))
    resolved = resolve_url(settings.amqp_url)
    assert (resolved.user, resolved.password) == (urlsplit(settings.amqp_url).username, "from-the-secret")


def test_keda_reads_the_queue_as_its_own_user_in_the_workers_vhost() -> None:
    """KEDA's trigger reaches the workers' broker and vhost, as a user of its own that may open the
    vhost and nothing more: protocol amqp reads a queue's length by a passive declare, which RabbitMQ
    checks no permission for (test_rabbitmq_permissions.py holds that on the real broker)."""
    (trigger,) = one("ScaledObject")["spec"]["triggers"]
    _, _, settings = worker()
    workers, keda = urlsplit(settings.amqp_url), urlsplit(keda_broker_url())
    assert (keda.scheme, keda.hostname, keda.port) == (workers.scheme, workers.hostname, workers.port)
    assert trigger["metadata"]["protocol"] == "amqp", "the http protocol needs a management-tagged user"
    assert trigger["metadata"]["vhostName"] == vhost_of(keda) == vhost_of(workers)
    assert keda.username and keda.username != workers.username, "KEDA borrows the workers' credentials"
    granted = grants(keda.username, vhost_of(keda))
    (user,) = [u for u in DEFINITIONS["users"] if u["name"] == keda.username]
    assert user["tags"] == [], f"{keda.username} needs no tag"
    names = {e["name"] for e in DEFINITIONS["exchanges"]} | {q["name"] for q in DEFINITIONS["queues"]}
    names |= {"amq.default", trigger["metadata"]["queueName"]}
    for verb, regex in granted.items():
        allowed = sorted(n for n in names if re.search(regex, n))
        assert not allowed, f"{keda.username} may {verb} {allowed}"
