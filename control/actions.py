"""The actions of `hotswap update | traffic` built from what an operator typed, and the words the CLI
says about them: shared with the web console (`console.actions`), so that both refuse the same
things with the same messages. ValueError says why (pydantic's ValidationError is one); `explain`
makes it one line.
"""

from __future__ import annotations

import os

from pydantic import ValidationError

from schemas.control import ArtifactRef, Command, Shadow, Traffic, Update


def update_action(version: str, *, artifact: str | None = None, sha256: str | None = None,
                  canary: float | None = None, standby: bool = False, new_contract: bool = False) -> Update:
    if (artifact is None) != (sha256 is None):
        raise ValueError("--artifact and --sha256 go together")
    activate = "canary" if canary is not None else "standby" if standby else "now"
    return Update(
        version=version, activate=activate, canary_percent=canary, new_contract=new_contract,
        artifact=ArtifactRef(uri=artifact, sha256=sha256) if artifact and sha256 else None,
    )


def traffic_action(weights: list[str], shadow: str | None = None) -> Traffic:
    try:
        split = {v: float(p) for v, _, p in (w.partition("=") for w in weights)}
        shadow_spec = None
        if shadow:
            name, _, percent = shadow.partition(":")
            shadow_spec = Shadow(version=name, percent=float(percent))
    except ValueError as exc:
        raise ValueError(f"weights look like 1.0.0=90 2.0.0=10, shadow like 2.0.0:20 ({explain(exc)})") from exc
    return Traffic(weights=split, shadow=shadow_spec)


def explain(exc: ValueError) -> str:
    """One line for people: pydantic's own messages, without its banner and links."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}"
                         f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors(include_url=False))
    return str(exc)


def issuer(program: str = "") -> str:
    """Who signs: the user and host, as the control log and the workers' logs name them."""
    return f"{program}{os.environ.get('USER', 'operator')}@{os.uname().nodename}"


def published(model: str, command: Command) -> str:
    return f"published {command.action.kind} for {model} as seq {command.seq} ({command.command_id})"
