"""`hotswap rollout MODEL VERSION`: shadow, canary steps and promotion, gated; `--resume`, `--abort`."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated

import typer

from control.actions import issuer
from control.commands import (
    DEFAULT_KEY,
    DEFAULT_WORKER_KEY,
    AmqpUrl,
    AsJson,
    KeyPath,
    Namespace,
    WorkerKeyPath,
    _url,
    _worker_verifier,
    console,
)
from control.operator import Operator
from control.rollout import Outcome, Rollout, RolloutError, Say, last_step
from schemas.rollout import RolloutPlan
from schemas.signing import Signer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(text: str) -> float:
    """'30s', '2m', '1.5h', '250ms' or plain seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration (30s, 2m, 1h, or seconds)")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def steps_of(text: str) -> list[float]:
    try:
        steps = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"--steps looks like 5,25,50,100 ({exc})") from exc
    return steps if steps and steps[-1] == 100 else [*steps, 100.0]


def rollout(
    model: str,
    version: Annotated[str | None, typer.Argument(help="the candidate (not with --resume / --abort)")] = None,
    stable: Annotated[str | None, typer.Option("--from", help="the stable version (default: the active one, "
                                                "as the workers' heartbeats report it)")] = None,
    shadow: Annotated[float, typer.Option(help="percent of jobs also run on the candidate in the shadow "
                                          "phase and every canary step; 0 skips the shadow phase")] = 50.0,
    steps: Annotated[str, typer.Option(help="canary weights of the candidate, percent")] = "5,25,50,100",
    interval: Annotated[str, typer.Option(help="shortest time each phase is watched (30s, 2m)")] = "30s",
    step_timeout: Annotated[str | None, typer.Option(
        help="a phase without a verdict by then aborts (default: 4 × interval, at least 60s)")] = None,
    min_samples: Annotated[int, typer.Option(help="jobs each gate needs before it may pass")] = 200,
    min_agreement: Annotated[float, typer.Option(help="floor of the mean agreement with stable")] = 0.9,
    max_error_rate: Annotated[float, typer.Option(help="allowed failure rate above stable's")] = 0.01,
    max_latency_ratio: Annotated[float, typer.Option(help="ceiling of candidate p99 / stable p99")] = 1.5,
    latency_slack: Annotated[float, typer.Option(help="milliseconds added to that ceiling")] = 2.0,
    confidence: Annotated[float, typer.Option(help="of the bounds every gate decides on")] = 0.99,
    resume: Annotated[bool, typer.Option(help="continue the model's rollout from its last step in the log")] = False,
    abort: Annotated[bool, typer.Option(help="abort the model's rollout: traffic back on stable")] = False,
    settle: Annotated[float, typer.Option(help="seconds each step listens for workers (> a heartbeat)")] = 2.5,
    as_json: AsJson = False, amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap",
    key: KeyPath = DEFAULT_KEY, worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Roll a version out in gated steps: preload, shadow, canary 5 → 25 → 50 → 100 %, promote.

    Each phase is judged on the candidate against stable on the same traffic (agreement of their
    answers, failure rate, p99 latency), on confidence bounds after --min-samples jobs. A failing
    gate aborts: traffic back on stable on every worker, the reason printed and in the log, exit 1."""
    if resume + abort + (version is not None) != 1:
        raise typer.BadParameter("give a VERSION to roll out, or --resume, or --abort")
    if not key.is_file():
        console.print(f"[red]no signing key at {key}[/red]: `hotswap keys generate`, or --key / HOTSWAP_CONTROL_KEY")
        raise typer.Exit(2)
    limits = plan_limits(shadow=shadow, steps=steps, interval=interval, step_timeout=step_timeout,
                         min_samples=min_samples, min_agreement=min_agreement, max_error_rate=max_error_rate,
                         max_latency_ratio=max_latency_ratio, latency_slack=latency_slack, confidence=confidence)
    signer, workers = Signer.from_file(key), _worker_verifier(worker_key)

    async def run() -> Outcome:
        async with Operator(_url(amqp_url), namespace=namespace, signer=signer, issuer=issuer(),
                            workers=workers) as op:
            if resume or abort:
                return await continue_rollout(op, model, abort, settle, console.print)
            assert version is not None
            base = stable or await active_version(op, model, settle)
            plan = RolloutPlan.model_validate({"stable": base, "candidate": version, **limits})
            return await Rollout(op, model, plan, say=console.print, settle_s=settle).run()

    try:
        outcome = asyncio.run(run())
    except (RolloutError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        print(json.dumps({"rollout_id": outcome.rollout_id, "promoted": outcome.promoted, "gate": outcome.gate,
                          "reason": outcome.reason, "rollback_s": outcome.rollback_s,
                          "verdicts": [{"phase": p, "gate": v.gate, "decision": v.decision, "reason": v.reason}
                                       for p, v in outcome.verdicts]}, indent=2))
    if not outcome.promoted:
        raise typer.Exit(1)


def plan_limits(
    *, shadow: float, steps: str, interval: str, step_timeout: str | None, min_samples: int, min_agreement: float,
    max_error_rate: float, max_latency_ratio: float, latency_slack: float, confidence: float,
) -> dict[str, object]:
    """A plan's limits from the options as typed (the web console's form sends the same texts)."""
    interval_s = duration_s(interval)
    timeout_s = duration_s(step_timeout) if step_timeout else max(4 * interval_s, 60.0)
    return {"shadow_percent": shadow, "steps": steps_of(steps), "interval_s": interval_s,
            "step_timeout_s": timeout_s, "min_samples": min_samples, "min_agreement": min_agreement,
            "max_error_rate": max_error_rate, "max_latency_ratio": max_latency_ratio,
            "latency_slack_ms": latency_slack, "confidence": confidence}


async def continue_rollout(op: Operator, model: str, abort: bool, settle: float, say: Say) -> Outcome:
    """`--resume` or `--abort`: from the model's last rollout step in the log."""
    newest = last_step(await op.read_log(), model)
    mark = newest.rollout
    assert mark is not None
    say(f"rollout {mark.rollout_id} of {model}: {mark.plan.stable} → {mark.plan.candidate}, "
        f"last step {mark.phase} #{mark.step} (seq {newest.seq})")
    runner = Rollout(op, model, mark.plan, rollout_id=mark.rollout_id, say=say, settle_s=settle)
    if abort:
        await runner.abort("operator", "aborted by the operator (hotswap rollout --abort)")
        return runner.outcome
    return await runner.run(start=(mark.phase, mark.step))


async def active_version(op: Operator, model: str, listen_s: float) -> str:
    beats = await op.heartbeats(listen_s)
    active = {b.models[model].active for b in beats.values() if model in b.models}
    if len(active) != 1 or None in active:
        seen = ", ".join(sorted(str(a) for a in active)) or "no worker heard"
        raise RolloutError(f"cannot tell the stable version of {model} ({seen}): give --from")
    return str(next(iter(active)))

