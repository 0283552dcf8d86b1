"""A producer that is not this project's code submits a job with the published contract alone.

The client is Debian's `amqp-tools` (C, on librabbitmq: `make test` installs it with apt-get);
the names it uses come from `schemas/asyncapi.json`, the job it sends and the result it gets are
checked against `schemas/json/`. Then the document itself is held to the broker and the worker:
each exchange and queue it describes declares again with exactly its kind and arguments (the
broker refuses a declaration that differs), and a result carries the properties it lists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import uuid
from typing import TYPE_CHECKING, Any

import aio_pika
import jsonschema
import pytest

from control.contracts import ASYNCAPI, SCHEMA_DIR
from schemas.topology import Topology

if TYPE_CHECKING:
    from conftest import HeldOut, StartWorker

pytestmark = pytest.mark.slow

DEFAULT_PREFIX = Topology().namespace


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SCHEMA_DIR.parent / name).read_text())
    return document


def tool(name: str, *args: str, stdin: bytes | None = None, timeout_s: float = 60) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (apt-get install amqp-tools)")
    try:
        done = subprocess.run([path, *args], input=stdin, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{name} gave nothing within {timeout_s} s") from exc
    assert done.returncode == 0, f"{name} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
    return done.stdout.decode()


def for_librabbitmq(amqp_url: str) -> str:
    """The URL as librabbitmq reads it: there a path of "/" names the vhost "" (as the AMQP URI spec
    says), where Python's clients take the default vhost; without a path it is "/" for both."""
    return amqp_url.removesuffix("/") if amqp_url.count("/") == 3 else amqp_url


def in_namespace(name: str, namespace: str, model: str) -> str:
    """A name of the document (the default namespace, `{model}` placeholders) in the test's namespace."""
    assert name.startswith(DEFAULT_PREFIX + ".") or not name.startswith(DEFAULT_PREFIX), name
    return name.replace(DEFAULT_PREFIX, namespace, 1).replace("{model}", model)


def test_a_job_from_amqp_tools_gets_a_result_valid_under_the_published_schema(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut]
) -> None:
    start_worker("shapes@2.0.0")
    asyncapi = json.loads(ASYNCAPI.read_text())
    jobs = asyncapi["channels"]["jobs"]["bindings"]["amqp"]["exchange"]
    assert jobs["type"] == "direct"
    job = {"schema_version": 1, "job_id": f"tools-{uuid.uuid4().hex[:8]}", "model": "shapes",
           "image": {"data": base64.b64encode(heldout[0].path.read_bytes()).decode()}}
    jsonschema.validate(job, load("json/job.schema.json"))  # the test itself keeps to the contract
    reply_queue = f"{namespace}.reply.amqp-tools"
    url = for_librabbitmq(amqp_url)
    tool("amqp-declare-queue", "--url", url, "--queue", reply_queue)
    try:
        # No correlation_id option in amqp-publish: the result then carries the job id as its own.
        tool("amqp-publish", "--url", url, "--exchange", in_namespace(jobs["name"], namespace, "shapes"),
             "--routing-key", "shapes", "--content-type", "application/json", "--reply-to", reply_queue,
             "--persistent", stdin=json.dumps(job).encode())
        body = tool("amqp-consume", "--url", url, "--queue", reply_queue, "--count", "1", "cat")
    finally:
        tool("amqp-delete-queue", "--url", url, "--queue", reply_queue)
    result = json.loads(body)
    jsonschema.validate(result, load("json/result.schema.json"), format_checker=jsonschema.FormatChecker())
    assert (result["job_id"], result["status"], result["model"], result["version"]) == (
        job["job_id"], "ok", "shapes", "2.0.0")
    assert result["detections"] and {d["class_name"] for d in result["detections"]} <= {"circle", "square", "triangle"}


async def test_the_documented_topology_and_properties_are_what_the_broker_and_the_worker_use(
    start_worker: StartWorker, namespace: str, amqp_url: str, heldout: list[HeldOut]
) -> None:
    start_worker("shapes@2.0.0")
    asyncapi = json.loads(ASYNCAPI.read_text())
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await _declare_as_documented(connection, asyncapi, namespace)
        await _result_properties_as_documented(connection, asyncapi, namespace, heldout[0].path.read_bytes())


async def _declare_as_documented(connection: aio_pika.abc.AbstractConnection, asyncapi: dict[str, Any],
                                 namespace: str) -> None:
    """Declare every exchange and every named queue the document describes, as it describes them:
    the broker closes the channel (PRECONDITION_FAILED) where the worker declared them otherwise."""
    declared = 0
    for channel in asyncapi["channels"].values():
        amqp = channel["bindings"]["amqp"]
        fresh = await connection.channel()  # a refusal closes the channel it came on
        if amqp["is"] == "routingKey":
            exchange = amqp["exchange"]
            await fresh.declare_exchange(in_namespace(exchange["name"], namespace, "shapes"),
                                         aio_pika.ExchangeType(exchange["type"]), durable=exchange["durable"])
        elif "{reply_to}" not in amqp["queue"]["name"]:  # a producer's, named by it
            queue = amqp["queue"]
            arguments = {k: in_namespace(v, namespace, "shapes") if isinstance(v, str) else v
                         for k, v in amqp["x-arguments"].items()}
            await fresh.declare_queue(in_namespace(queue["name"], namespace, "shapes"), durable=queue["durable"],
                                      exclusive=queue["exclusive"], auto_delete=queue["autoDelete"],
                                      arguments=arguments)
        else:
            continue
        declared += 1
        await fresh.close()
    assert declared >= 6


async def _result_properties_as_documented(connection: aio_pika.abc.AbstractConnection, asyncapi: dict[str, Any],
                                           namespace: str, image: bytes) -> None:
    messages = asyncapi["components"]["messages"]
    channel = await connection.channel()
    replies = await channel.declare_queue(exclusive=True)
    job = {"schema_version": 1, "job_id": "props-1", "model": "shapes",
           "image": {"data": base64.b64encode(image).decode()}}
    jobs = asyncapi["channels"]["jobs"]["bindings"]["amqp"]["exchange"]["name"]
    exchange = await channel.get_exchange(in_namespace(jobs, namespace, "shapes"))
    await exchange.publish(aio_pika.Message(
        json.dumps(job).encode(), content_type="application/json", correlation_id="corr-1", reply_to=replies.name,
        type=messages["job"]["bindings"]["amqp"]["messageType"], delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
    ), routing_key="shapes", mandatory=True)
    async with asyncio.timeout(60), replies.iterator() as results:
        async for message in results:
            await message.ack()
            break
    documented = messages["result"]["headers"]["properties"]
    assert message.type == messages["result"]["bindings"]["amqp"]["messageType"] == documented["type"]["const"]
    assert message.content_type == documented["content_type"]["const"]
    assert message.correlation_id == "corr-1", "the job's correlation_id comes back"
    assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT, "as durable as the job: no more"
    jsonschema.validate(json.loads(message.body), load("json/result.schema.json"))
