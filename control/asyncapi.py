"""The AsyncAPI 3.0 document of the pool's AMQP channels (`schemas/asyncapi.json`), generated.

Nothing in it is written twice. Names come from `schemas.topology`; exchange kinds, queue
arguments and bindings from running `worker.declarer.Declarer` itself against a recorder that
notes what it declares (no broker: the recorder answers at once); payloads are `$ref`s to the
JSON Schemas generated from the pydantic models beside it. A change to any of them changes the
document, and the freshness test fails until `hotswap schema --write` is run.

Names are those of the default namespace, `hotswap`: `HOTSWAP_NAMESPACE` replaces that prefix.
The vhost is the server's variable `vhost`: by default `hotswap`, that of the users and
permissions in ops/rabbitmq/definitions.json, which the bindings name too.
"""

from __future__ import annotations

import inspect
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from aio_pika.abc import AbstractChannel

from control.client import Client
from schemas.jobs import SCHEMA_VERSION
from schemas.topology import HEARTBEAT_TYPE, JOB_TYPE, PROGRESS_TYPE, RESULT_TYPE, SYNC_TYPE, Topology
from worker.config import WorkerSettings
from worker.declarer import FROM_THE_START, Declarer

BINDING_VERSION = "0.3.0"
#: The vhost of ops/rabbitmq/definitions.json (tests/control/test_contracts.py holds them equal).
#: The quick start's guest runs on RabbitMQ's default vhost `/` instead: the same entities, there.
VHOST = "hotswap"
#: Placeholders standing for a model, a worker and a reply queue in names and routing keys.
MODEL, WORKER, REPLY_TO = "{model}", "{worker_id}", "{reply_to}"


@dataclass
class _Exchange:
    name: str
    type: str
    durable: bool


@dataclass
class _Queue:
    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, Any]
    bound: list[tuple[str, str]] = field(default_factory=list)  # (exchange, routing key)

    async def bind(self, exchange: _Exchange, routing_key: str = "") -> None:
        self.bound.append((exchange.name, routing_key))


class _Recorder:
    """Stands in for a channel: notes each exchange and queue the declarer declares, as declared."""

    def __init__(self) -> None:
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}

    async def declare_exchange(self, name: str, type: Any, *, durable: bool = False) -> _Exchange:
        self.exchanges[name] = _Exchange(name, str(getattr(type, "value", type)), durable)
        return self.exchanges[name]

    async def declare_queue(self, name: str = "", *, durable: bool = False, exclusive: bool = False,
                            auto_delete: bool = False, arguments: dict[str, Any] | None = None) -> _Queue:
        self.queues[name] = _Queue(name, durable, exclusive, auto_delete, dict(arguments or {}))
        return self.queues[name]

    # The declarer first tries each declaration on a probe channel (is this user allowed to
    # configure it?): the document describes what a user that may declares, so every probe passes.
    async def get_underlay_channel(self) -> _Recorder:
        return self

    @property
    def connection(self) -> _Recorder:
        return self

    async def channel(self) -> _Recorder:
        return self

    async def exchange_declare(self, *_: object, **__: object) -> None:
        return None

    async def queue_declare(self, *_: object, **__: object) -> None:
        return None

    is_closed = False

    async def close(self) -> None:
        return None


def _finish(step: Coroutine[Any, Any, object]) -> None:
    """Run a declaration to its end: against the recorder nothing ever waits, so the first step is
    the whole of it (and no event loop is needed, nor in the way when one runs)."""
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("a declaration waited on something: the recorder cannot answer it")


def record_topology(topology: Topology) -> _Recorder:
    """What the declarer declares for one model's jobs, the control plane, status and a reply queue."""
    recorder = _Recorder()
    declarer = Declarer(cast(AbstractChannel, recorder), topology)
    _finish(declarer.job_queue(MODEL, _default(WorkerSettings.model_fields["delivery_limit"].default)))
    _finish(declarer.control())
    _finish(declarer.status_exchange())
    _finish(declarer.reply_queue(REPLY_TO, _default(inspect.signature(Client).parameters["reply_queue_ttl_s"].default)))
    return recorder


def _default(value: Any) -> Any:
    if value is inspect.Parameter.empty or value is None:
        raise ValueError("a default the document names is gone")
    return value


def _exchange_binding(exchange: _Exchange) -> dict[str, Any]:
    return {"amqp": {"is": "routingKey", "bindingVersion": BINDING_VERSION,
                     "exchange": {"name": exchange.name, "type": exchange.type, "durable": exchange.durable,
                                  "autoDelete": False, "vhost": VHOST}}}


def _queue_binding(queue: _Queue, **extensions: Any) -> dict[str, Any]:
    # The binding has no field for queue arguments nor for what a queue is bound to: extensions.
    amqp: dict[str, Any] = {
        "is": "queue", "bindingVersion": BINDING_VERSION,
        "queue": {"name": queue.name, "durable": queue.durable, "exclusive": queue.exclusive,
                  "autoDelete": queue.auto_delete, "vhost": VHOST},
        "x-arguments": queue.arguments,
        "x-bound-to": [{"exchange": exchange, "routingKey": key} for exchange, key in queue.bound],
    }
    return {"amqp": {**amqp, **extensions}}


def _parameters(*names: str) -> dict[str, Any]:
    described = {"model": "a model's name (the manifest's `model`)", "worker_id": "a worker's id (HOTSWAP_WORKER_ID)",
                 "reply_to": "the queue named in the job's `reply_to` property"}
    return {name: {"description": described[name]} for name in names}


def _refs(*messages: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/messages/{name}"} for name in messages}


def channels(topology: Topology) -> dict[str, Any]:
    seen = record_topology(topology)
    exchanges, queues = seen.exchanges, seen.queues
    return {
        "jobs": {
            "address": MODEL, "title": "Jobs, by model", "parameters": _parameters("model"),
            "description": f"Publish a job to the direct exchange `{topology.jobs_exchange}` with the model's "
                           "name as routing key, `mandatory` on: a model no worker serves comes back as a return.",
            "messages": _refs("job"), "bindings": _exchange_binding(exchanges[topology.jobs_exchange]),
        },
        "jobQueue": {
            "address": topology.job_queue(MODEL), "title": "A model's job queue", "parameters": _parameters("model"),
            "description": "The quorum queue the model's workers consume. A job delivered more often than the "
                           "delivery limit (HOTSWAP_DELIVERY_LIMIT) is dead-lettered, as is a malformed job once "
                           "answered.",
            "messages": _refs("job"), "bindings": _queue_binding(queues[topology.job_queue(MODEL)]),
        },
        "deadLetters": {
            "address": topology.dead_letter_queue(MODEL), "title": "A model's dead letters",
            "parameters": _parameters("model"),
            "description": f"Jobs dead-lettered through `{topology.dead_letter_exchange}` "
                           f"({exchanges[topology.dead_letter_exchange].type}), as they were published: to inspect "
                           "and replay.",
            "messages": _refs("job"), "bindings": _queue_binding(queues[topology.dead_letter_queue(MODEL)]),
        },
        "results": {
            "address": REPLY_TO, "title": "A producer's reply queue", "parameters": _parameters("reply_to"),
            "description": "The producer declares it and names it in each job's `reply_to`; workers publish results "
                           "to it through the default exchange, `mandatory` and confirmed, before acking the job. "
                           "Declare it durable with `x-expires` (as here, the Python client's) for results that "
                           "outlive a broker restart and a queue that goes away after its producer does.",
            "messages": _refs("result"), "bindings": _queue_binding(queues[REPLY_TO]),
        },
        "control": {
            "address": "", "title": "Signed control commands",
            "description": f"The operator publishes signed commands to the fanout exchange "
                           f"`{topology.control_exchange}` (the routing key is ignored).",
            "messages": _refs("command", "sync"), "bindings": _exchange_binding(exchanges[topology.control_exchange]),
        },
        "controlLog": {
            "address": topology.control_log, "title": "The control log",
            "description": "The stream every worker reads from its first entry (consumer argument `x-stream-offset`), "
                           "so that a worker starting late converges to the same state as the others.",
            "messages": _refs("command", "sync"),
            "bindings": _queue_binding(queues[topology.control_log], **{"x-consumer-arguments": dict(FROM_THE_START)}),
        },
        "progress": {
            "address": topology.progress_key(MODEL, WORKER), "title": "Progress through commands",
            "parameters": _parameters("model", "worker_id"),
            "description": f"Each worker's progress through each command, on the topic exchange "
                           f"`{topology.status_exchange}`: bind a queue with `progress.#`.",
            "messages": _refs("progress"), "bindings": _exchange_binding(exchanges[topology.status_exchange]),
        },
        "heartbeats": {
            "address": topology.heartbeat_key(WORKER), "title": "Heartbeats", "parameters": _parameters("worker_id"),
            "description": f"Each worker's state, every HOTSWAP_HEARTBEAT_INTERVAL_S, on `{topology.status_exchange}`: "
                           "bind a queue with `heartbeat.#`.",
            "messages": _refs("heartbeat"), "bindings": _exchange_binding(exchanges[topology.status_exchange]),
        },
    }


def _channel(name: str) -> dict[str, str]:
    return {"$ref": f"#/channels/{name}"}


def _messages(channel: str, *names: str) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names]


def _amqp_operation(**fields: Any) -> dict[str, Any]:
    return {"amqp": {**fields, "bindingVersion": BINDING_VERSION}}


def operations() -> dict[str, Any]:
    """Who does what: `x-actor` names the side (the document covers the workers and their clients)."""
    reply = {"address": {"location": "$message.header#/reply_to"}, "channel": _channel("results"),
             "messages": _messages("results", "result")}
    return {
        "submitJob": {
            "action": "send", "x-actor": "producer", "channel": _channel("jobs"), "messages": _messages("jobs", "job"),
            "summary": "Submit a job; its result comes back on the queue named in `reply_to`.", "reply": reply,
            "bindings": _amqp_operation(deliveryMode=2, mandatory=True),
        },
        "serveJob": {
            "action": "receive", "x-actor": "worker", "channel": _channel("jobQueue"),
            "messages": _messages("jobQueue", "job"), "reply": reply, "bindings": _amqp_operation(ack=True),
            "summary": "Answer every job with a result (errors included), confirmed before the job is acked.",
        },
        "issueCommand": {
            "action": "send", "x-actor": "operator", "channel": _channel("control"),
            "messages": _messages("control", "command"), "bindings": _amqp_operation(deliveryMode=2),
            "summary": "Publish a command signed with the operator's Ed25519 key (`hotswap update` and the like).",
        },
        "applyCommands": {
            "action": "receive", "x-actor": "worker", "channel": _channel("controlLog"),
            "messages": _messages("controlLog", "command", "sync"),
            "summary": "Read the log from its start, verify each command, apply each model's in sequence order.",
        },
        "reportProgress": {
            "action": "send", "x-actor": "worker", "channel": _channel("progress"),
            "messages": _messages("progress", "progress"),
            "summary": "Report each phase of a command: received, preload, validate, swap, cleanup, then done, "
                       "failed or refused.",
        },
        "sendHeartbeat": {
            "action": "send", "x-actor": "worker", "channel": _channel("heartbeats"),
            "messages": _messages("heartbeats", "heartbeat"), "summary": "Say which versions serve, and how.",
        },
    }


def _props(**properties: dict[str, Any]) -> dict[str, Any]:
    """The AMQP properties and header-table entries a message carries, as one object schema:
    `$message.header#/reply_to` and the like point into it."""
    return {"type": "object", "properties": properties}


_JSON = {"const": "application/json"}


def _typed(kind: str) -> dict[str, Any]:
    return {"const": kind, "description": "the AMQP `type` property"}


def _signed(schema: str, what: str) -> dict[str, Any]:
    return {"payload": {"$ref": "json/signed-envelope.schema.json"}, "x-signed-body": {"$ref": f"json/{schema}"},
            "description": f"A signed envelope: `body` is {what}'s JSON text (`x-signed-body`), `signature` the "
                           "Ed25519 signature of its UTF-8 bytes, standard base64. Believe only bodies the key "
                           "verifies."}


def messages() -> dict[str, Any]:
    job_id = {"type": "string", "description": "the job's id: the worker copies it to the result (the job's "
              "`job_id` when absent)"}
    return {
        "job": {
            "name": "job", "title": "Job", "contentType": "application/json",
            "payload": {"$ref": "json/job.schema.json"},
            "correlationId": {"location": "$message.header#/correlation_id"},
            "headers": {**_props(
                reply_to={"type": "string", "description": "the queue the result goes to; without it the job is "
                          "dead-lettered (`missing_reply_to`)"},
                correlation_id=job_id, message_id={"type": "string", "description": "the job id, by convention"},
                content_type=_JSON, type=_typed(JOB_TYPE),
                delivery_mode={"enum": [1, 2], "description": "2, persistent: the result is persistent too"},
                **{"x-delivery-count": {"type": "integer", "description": "set by the quorum queue on a "
                   "redelivery; the result's `attempt` is one more"}},
            ), "required": ["reply_to"]},
            "bindings": {"amqp": {"messageType": JOB_TYPE, "bindingVersion": BINDING_VERSION}},
            "examples": [{"name": "inline", "headers": {"reply_to": "my-results", "correlation_id": "42",
                                                        "content_type": "application/json"},
                          "payload": {"schema_version": SCHEMA_VERSION, "job_id": "42", "model": "shapes",
                                      "image": {"data": "iVBORw0KGgo="}, "params": {"conf": 0.25}}}],
        },
        "result": {
            "name": "result", "title": "Result", "contentType": "application/json",
            "payload": {"$ref": "json/result.schema.json"},
            "correlationId": {"location": "$message.header#/correlation_id"},
            "headers": _props(correlation_id=job_id, content_type=_JSON, type=_typed(RESULT_TYPE),
                              delivery_mode={"enum": [1, 2], "description": "the job's"}),
            "bindings": {"amqp": {"messageType": RESULT_TYPE, "bindingVersion": BINDING_VERSION}},
        },
        "command": {
            "name": "command", "title": "Signed command", "contentType": "application/json",
            **_signed("command.schema.json", "the command"),
            "headers": _props(message_id={"type": "string", "description": "the command's id"}, content_type=_JSON,
                              **{"x-stream-offset": {"type": "integer", "description": "the entry's offset in the "
                                 "control log, as the stream delivers it"}}),
        },
        "sync": {
            "name": "sync", "title": "Sync marker",
            "summary": "An empty message a reader publishes; reading it back through the stream, it has read the "
                       "whole log up to the moment it asked. Every other reader skips it.",
            "payload": {"type": "string", "maxLength": 0},
            "headers": _props(type=_typed(SYNC_TYPE), message_id={"type": "string", "description": "the reader's "
                              "marker"}),
            "bindings": {"amqp": {"messageType": SYNC_TYPE, "bindingVersion": BINDING_VERSION}},
        },
        "progress": {
            "name": "progress", "title": "Progress event", "contentType": "application/json",
            **_signed("progress.schema.json", "the progress event"),
            "headers": _props(content_type=_JSON, type=_typed(PROGRESS_TYPE)),
            "bindings": {"amqp": {"messageType": PROGRESS_TYPE, "bindingVersion": BINDING_VERSION}},
        },
        "heartbeat": {
            "name": "heartbeat", "title": "Heartbeat", "contentType": "application/json",
            **_signed("heartbeat.schema.json", "the heartbeat"),
            "headers": _props(content_type=_JSON, type=_typed(HEARTBEAT_TYPE)),
            "bindings": {"amqp": {"messageType": HEARTBEAT_TYPE, "bindingVersion": BINDING_VERSION}},
        },
    }


def asyncapi_document(topology: Topology | None = None) -> dict[str, Any]:
    topology = topology or Topology()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Hotswap", "version": str(SCHEMA_VERSION),
            "description": "Vision model workers fed from RabbitMQ, and their clients: producers submit jobs and "
                           "get results on reply queues; operators publish signed commands; workers report "
                           "progress and heartbeats. Each operation's `x-actor` says which side performs it. Names "
                           f"are those of the namespace `{topology.namespace}` (HOTSWAP_NAMESPACE replaces the "
                           "prefix). A message's `headers` list the AMQP properties (reply_to, correlation_id, "
                           "content_type, type, delivery_mode, message_id) and header-table entries (x-…) it "
                           "carries. The vhost is the server's `vhost` variable, by default the shipped "
                           f"definitions' `{VHOST}`, which the bindings name; with guest on RabbitMQ's default "
                           "vhost `/` (the quick start) the same entities live there. Generated by "
                           "`hotswap schema --write`: do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {"broker": {
            "host": "127.0.0.1:5672", "pathname": "/{vhost}", "protocol": "amqp", "protocolVersion": "0-9-1",
            "description": "RabbitMQ (quorum queues and streams); HOTSWAP_AMQP_URL elsewhere, whose path is the "
                           "vhost",
            "variables": {"vhost": {
                "default": VHOST,
                "description": "the virtual host: `hotswap` with the users of ops/rabbitmq/definitions.json; `%2F` "
                               "(URL-encoded) for RabbitMQ's default vhost `/`, where the quick start connects as "
                               "guest",
                "examples": [VHOST, "%2F"],
            }},
        }},
        "channels": channels(topology),
        "operations": operations(),
        "components": {"messages": messages()},
    }
