"""What tests/ops/test_stack.py and test_k8s.py share: the `hotswap` CLI as the deployments call it,
the worker's settings as they set them, and the Dockerfile as BuildKit's parser reads it."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import typer.main
from typer.testing import CliRunner

from control.cli import app
from worker.config import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_PREFIX = "HOTSWAP_"
#: Read from the environment when the worker connects (worker/connections.py's resolve_url), not a
#: setting: the file holding the broker password (test_k8s.py checks the worker reads it).
CONNECTION_ENVVARS = {"HOTSWAP_AMQP_PASSWORD_FILE"}
#: Shell operators that end one command of a `sh -c` script and start the next.
_SHELL_SEPARATORS = {"||", "&&", ";", "|", "&", "{", "}", "(", ")", ";;"}


@dataclass(frozen=True)
class Invocation:
    """One `hotswap` command line: the subcommand path (`zoo build`), what follows it, the leaf."""

    path: tuple[str, ...]
    args: tuple[str, ...]
    command: Any  # typer's click Command


def hotswap_argv(argv: Sequence[str]) -> list[list[str]]:
    """The `hotswap` command lines in a container's argv: itself, or each one a `sh -c` script runs."""
    if argv and argv[0] == "hotswap":
        return [list(argv[1:])]
    if len(argv) == 3 and argv[0] in ("sh", "/bin/sh", "bash") and argv[1] == "-c":
        return _script_commands(argv[2])
    return []


def _script_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in _SHELL_SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [command[1:] for command in commands if command and command[0] == "hotswap"]


def resolve(args: Sequence[str]) -> Invocation:
    """Walk `hotswap`'s command groups down to the command `args` names; fails on an unknown one."""
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`hotswap {' '.join(path)}` has no command {rest[0]!r} (of {sorted(command.commands)})"
        path.append(rest.pop(0))
        command = sub
    assert path, f"no hotswap command in {list(args)}"
    return Invocation(tuple(path), tuple(rest), command)


def check_hotswap(args: Sequence[str]) -> Invocation:
    """`args` is a real `hotswap` command line: its command answers `--help`, and its options and
    arguments parse as the CLI parses them (without running it)."""
    invocation = resolve(args)
    result = CliRunner().invoke(app, [*invocation.path, "--help"])
    assert result.exit_code == 0, f"hotswap {' '.join(invocation.path)} --help: {result.output}"
    try:
        invocation.command.make_context(invocation.path[-1], list(invocation.args))
    except Exception as exc:  # typer's click raises its own UsageError types
        pytest.fail(f"`hotswap {' '.join(args)}` does not parse: {exc}")
    return invocation


def option_envvars(command: Any) -> set[str]:
    """The environment variables a command's options read (`envvar=`)."""
    names: set[str] = set()
    for param in command.params:
        envvar = param.envvar
        names.update([envvar] if isinstance(envvar, str) else envvar or [])
    return names


def cli_envvars() -> set[str]:
    """The environment variables any `hotswap` command reads (an operator container runs several)."""
    names: set[str] = set()
    pending: list[Any] = [typer.main.get_command(app)]
    while pending:
        command = pending.pop()
        names |= option_envvars(command)
        pending.extend(getattr(command, "commands", {}).values())
    return names


def settings_envvars() -> set[str]:
    """Every `HOTSWAP_*` variable WorkerSettings reads."""
    return {SETTINGS_PREFIX + name.upper() for name in WorkerSettings.model_fields}


def accepted_envvars(invocation: Invocation) -> set[str]:
    """What the command reads from the environment: its options' and, for `worker`, the settings and
    the broker password's file."""
    names = option_envvars(invocation.command)
    return names | settings_envvars() | CONNECTION_ENVVARS if invocation.path == ("worker",) else names


@contextmanager
def worker_environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ with only these HOTSWAP_* variables, as a container would have them."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith(SETTINGS_PREFIX)]:
            del os.environ[name]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_settings(env: Mapping[str, str]) -> WorkerSettings:
    """The settings a worker would start with in this environment (values validated as it does)."""
    with worker_environment(env):
        return WorkerSettings()


# --- the Dockerfile ------------------------------------------------------------------------------

#: Instructions BuildKit knows; the parser itself accepts any word.
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> tuple[Any, ...]:
    """The Dockerfile through BuildKit's own parser (the `dockerfile` package)."""
    return tuple(dockerfile.parse_file(str(path)))


def final_stage(commands: Sequence[Any]) -> list[Any]:
    """The instructions of the last stage: what the image runs."""
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return list(commands[starts[-1]:])


def last(stage: Sequence[Any], instruction: str) -> Any:
    found = [c for c in stage if c.cmd == instruction]
    assert found, f"the final stage has no {instruction}"
    return found[-1]


def exec_form(command: Any) -> list[str]:
    """An instruction in JSON (exec) form, as a list; shell form is refused (no signals to PID 1)."""
    assert command.json, f"{command.original!r} is in shell form: SIGTERM would go to a shell, not to hotswap"
    return list(command.value)


def image_env(stage: Sequence[Any]) -> dict[str, str]:
    pairs = [c.value for c in stage if c.cmd == "ENV"]
    return {k: v for value in pairs for k, v in zip(value[::2], value[1::2], strict=True)}


def image_uid(stage: Sequence[Any]) -> int:
    """The final USER, which must be numeric (Kubernetes' runAsNonRoot can verify only a number)."""
    user = last(stage, "USER").value[0]
    match = re.fullmatch(r"(\d+)(?::\d+)?", user)
    assert match, f"USER {user!r} is not numeric"
    return int(match.group(1))
