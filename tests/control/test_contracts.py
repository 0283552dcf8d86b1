"""The published contracts: fresh, well formed, and describing what really travels.

No package on PyPI ships the official AsyncAPI 3.0 JSON Schema, so it is vendored from npm's
`@asyncapi/specs` (tests/control/asyncapi-3.0.0/, its README says which file, version and licence):
the document is validated against it, AMQP 0-9-1 bindings 0.3.0 included, and then checked for
what no schema can say: that every `$ref` lands, and that names agree with what they name.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.contracts import ASYNCAPI, README, SCHEMA_DIR, json_schemas, published, readme_with_outputs
from schemas.control import Command, Heartbeat, ModelStatus, Progress, Update, VersionStatus
from schemas.errors import ErrorCode
from schemas.jobs import Box, Detection, ImageInfo, InlineImage, Job, JobError, JobResult
from schemas.outputs import Rle, SegmentOutput
from schemas.signing import Signer


def test_every_published_file_is_what_its_source_generates() -> None:
    for path, text in published().items():
        assert path.exists(), f"run `hotswap schema --write`: {path.name} is missing"
        assert path.read_text() == text, f"run `hotswap schema --write`: {path.name} changed"
    lingering = {p.name for p in SCHEMA_DIR.glob("*.schema.json")} - {p.name for p in published()}
    assert not lingering, f"no model publishes {sorted(lingering)} any more: run `hotswap schema --write`"
    readme = README.read_text()
    assert readme_with_outputs(readme) == readme, "run `hotswap schema --write`: the README's outputs table changed"


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


@pytest.mark.parametrize("name", list(json_schemas()))
def test_each_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = load(SCHEMA_DIR / f"{name}.schema.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.validators.validator_for(schema).check_schema(schema)


def validate(instance: object, name: str) -> None:
    schema = load(SCHEMA_DIR / f"{name}.schema.json")
    jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())


def wire(model: Job | JobResult | Command | Progress | Heartbeat) -> Any:
    """What goes on the wire: the JSON text the worker, client or operator sends, parsed."""
    return json.loads(model.model_dump_json(exclude_none=True))


NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def test_what_travels_validates_against_its_schema_and_what_would_be_refused_does_not() -> None:
    job = Job(job_id="42", model="shapes", image=InlineImage(data=b"\x89PNG"), deadline=NOW)
    validate(wire(job), "job")
    result = JobResult(
        job_id="42", status="ok", model="shapes", version="2.0.0", worker_id="w1", image=ImageInfo(width=64, height=48),
        detections=[Detection(class_id=0, class_name="circle", score=0.9, box=Box(x1=1, y1=2, x2=30, y2=40))],
        output=SegmentOutput(masks=[Rle(size=(48, 64), counts="PPYo1")]),
    )
    validate(wire(result), "result")
    failed = JobResult(job_id="42", status="error", worker_id="w1",
                       error=JobError(code=ErrorCode.NOT_AN_IMAGE, message="no"))
    validate(wire(failed), "result")
    command = Command(command_id="c1", model="shapes", seq=3, issued_at=NOW, issuer="ops",
                      action=Update(version="2.0.0"))
    validate(wire(command), "command")
    progress = Progress(worker_id="w1", command_id="c1", model="shapes", seq=3, phase="swap", at=NOW)
    validate(wire(progress), "progress")
    heartbeat = Heartbeat(worker_id="w1", at=NOW, models={"shapes": ModelStatus(
        active="2.0.0", versions={"2.0.0": VersionStatus(state="active", weight=100)})})
    validate(wire(heartbeat), "heartbeat")
    signer = Signer(Ed25519PrivateKey.generate())
    validate(json.loads(signer.sign(command).model_dump_json()), "signed-envelope")
    validate(json.loads(signer.sign_event(progress)), "signed-envelope")

    refused: list[tuple[object, str]] = [
        ({**wire(job), "model": "Shapes!"}, "job"),
        ({k: v for k, v in wire(result).items() if k != "worker_id"}, "result"),
        ({**wire(result), "error": {"code": "no_such_code", "message": "m"}}, "result"),
        ({**wire(result), "surprise": 1}, "result"),
        ({**wire(command), "seq": 0}, "command"),
        ({**wire(progress), "phase": "celebrate"}, "progress"),
    ]
    for instance, name in refused:
        with pytest.raises(jsonschema.ValidationError):
            validate(instance, name)


# --- the AsyncAPI document --------------------------------------------------------------------

#: The official AsyncAPI 3.0.0 document schema (draft-07), vendored.
ASYNCAPI_3_SCHEMA = Path(__file__).parent / "asyncapi-3.0.0" / "schema.json"
DEFINITIONS = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq" / "definitions.json"


def _deepest(error: jsonschema.ValidationError) -> str:
    """Where and why, from the branch of a oneOf (Reference or object) that came nearest."""
    best = jsonschema.exceptions.best_match([error])
    return f"{'/'.join(map(str, best.absolute_path)) or '(root)'}: {best.message[:300]}"


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return load(ASYNCAPI)


def resolve(document: dict[str, Any], ref: str) -> Any:
    """A `$ref` of the AsyncAPI document: a pointer into it, or a file beside it (then a pointer);
    a reference to a reference is followed."""
    where, _, pointer = ref.partition("#")
    target = load(ASYNCAPI.parent / where) if where else document
    for part in filter(None, pointer.split("/")):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    if isinstance(target, dict) and set(target) == {"$ref"} and not where:
        return resolve(document, target["$ref"])
    return target


def refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_the_asyncapi_document_follows_the_official_asyncapi_3_0_0_schema(asyncapi: dict[str, Any]) -> None:
    schema = load(ASYNCAPI_3_SCHEMA)
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = [_deepest(e) for e in validator.iter_errors(asyncapi)]
    assert not errors, errors
    assert asyncapi["asyncapi"] == "3.0.0"
    assert set(asyncapi["channels"]) >= {"jobs", "jobQueue", "results", "control", "controlLog", "progress",
                                         "heartbeats"}


def test_the_vhost_is_a_server_variable_and_the_bindings_name_the_definitions_vhost(
    asyncapi: dict[str, Any],
) -> None:
    """Server variables fill only `host` and `pathname` (an AMQP URL's path is its vhost); a binding's
    `vhost` is a plain string (default `/`): both name the vhost ops/rabbitmq/definitions.json makes."""
    (vhost,) = [v["name"] for v in load(DEFINITIONS)["vhosts"]]
    (server,) = asyncapi["servers"].values()
    variables = set(re.findall(r"{([^}]+)}", server["host"] + server.get("pathname", "")))
    assert variables == set(server.get("variables", {})), "every {variable} of host and pathname is defined"
    assert server["pathname"] == "/{vhost}"
    assert server["variables"]["vhost"]["default"] == vhost
    bound = {b["amqp"][kind]["vhost"] for c in asyncapi["channels"].values() if (b := c.get("bindings"))
             for kind in ("exchange", "queue") if kind in b["amqp"]}
    assert bound == {vhost}, bound


def test_every_ref_lands_and_every_wire_schema_is_used(asyncapi: dict[str, Any]) -> None:
    for ref in refs(asyncapi):
        resolve(asyncapi, ref)  # KeyError or FileNotFoundError: a dangling reference
    files = {ref.partition("#")[0] for ref in refs(asyncapi)} - {""}
    committed = {f"json/{p.name}" for p in SCHEMA_DIR.glob("*.schema.json")}
    assert files <= committed
    # The manifest travels in model repositories and /status over HTTP, not on AMQP.
    assert committed - files == {"json/manifest.schema.json", "json/status.schema.json"}


def test_each_channel_names_its_parameters_and_its_messages_come_from_the_components(
    asyncapi: dict[str, Any],
) -> None:
    for name, channel in asyncapi["channels"].items():
        placeholders = set(re.findall(r"{([^}]+)}", channel["address"] or ""))
        assert placeholders == set(channel.get("parameters", {})), name
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/"), name


def test_operations_send_and_receive_only_what_their_channels_carry(asyncapi: dict[str, Any]) -> None:
    for name, operation in asyncapi["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation.get("messages", []):
            assert message["$ref"].startswith(channel + "/messages/"), name
        if "reply" in operation:
            reply = operation["reply"]
            for message in reply["messages"]:
                assert message["$ref"].startswith(reply["channel"]["$ref"] + "/messages/"), name
            # The reply goes where the request's reply_to says, which the request's headers list.
            for message in operation["messages"]:
                headers = resolve(asyncapi, message["$ref"])["headers"]
                assert reply["address"]["location"] == "$message.header#/reply_to"
                assert "reply_to" in headers["required"], name


def test_each_message_example_validates_against_its_payload_and_headers(asyncapi: dict[str, Any]) -> None:
    examples = 0
    for name, message in asyncapi["components"]["messages"].items():
        for example in message.get("examples", []):
            jsonschema.validate(example["payload"], resolve(asyncapi, message["payload"]["$ref"]))
            jsonschema.validate(example["headers"], message["headers"])
            examples += 1
        assert message.get("correlationId", {}).get("location", "$message.header#/").startswith("$message.header#/")
        if "correlationId" in message:
            field = message["correlationId"]["location"].rpartition("/")[2]
            assert field in message["headers"]["properties"], name
    assert examples
