"""The worker's logs: text lines by default, one JSON object per line with `HOTSWAP_LOG_FORMAT=json`.

JSON lines carry what they are about as fields, so that one job or one update can be followed
across the workers of a fleet by a log collector: `worker_id` on every line, and `job_id`,
`command_id`, `model`, `version`, `seq`, `phase` where they apply. Those come from two places:

- `log_context(...)`, set by the job path and the control loop around the work they do: every
  line logged inside carries its fields, the model runtime's too (it cannot import this module);
- `extra=` on a single call, which wins over the context (a freed version is not the target).

Only the stdlib: a formatter is a few lines, not worth a dependency.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Never mutated: `log_context` sets a new mapping, so the shared empty default stays empty.
_CONTEXT: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "hotswap_log_context", default=MappingProxyType({}))

#: The attributes every LogRecord has: any other attribute of a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
#: Keys a field may not take over: a line always says when, how bad, where from and what.
_CORE = ("time", "level", "logger", "message")


def log_context(**fields: object) -> LogContext:
    """Add `fields` (those not None) to every line logged inside, in this task or thread only."""
    return LogContext({k: v for k, v in fields.items() if v is not None})


class LogContext:
    """`log_context`'s context manager. A class, not a generator: every job enters one, and a
    generator-based context manager costs several times more on that path."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, object]) -> None:
        self._fields = fields
        self._token: contextvars.Token[Mapping[str, object]] | None = None

    def __enter__(self) -> None:
        if self._fields:  # nothing to add: the context stays as it is
            self._token = _CONTEXT.set({**_CONTEXT.get(), **self._fields})

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _CONTEXT.reset(self._token)
            self._token = None


def context_fields() -> Mapping[str, object]:
    """The fields `log_context` has set here."""
    return _CONTEXT.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, the static fields (the
    worker's id), message, the context's fields, the call's `extra=`, and a traceback as text."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        for key, value in {**self.static, **_CONTEXT.get(), **extras}.items():
            if key not in _CORE:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field holding a path or an exception still makes a line, never a logging error.
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(log_format: LogFormat = "text", *, level: int = logging.INFO,
                      static: Mapping[str, object] | None = None) -> None:
    """Send the process's logs to stderr in `log_format`; `static` fields go on every JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static) if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if log_format == "json":
        # Python's warnings go to stderr as bare text; through logging they become JSON lines too.
        logging.captureWarnings(True)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
