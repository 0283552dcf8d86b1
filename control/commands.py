"""`hotswap update | rollback | traffic | unload | on-demand | status | watch | keys`: the operator's CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from control.actions import explain, issuer, published, traffic_action, update_action
from control.client import DEFAULT_AMQP_URL
from control.operator import Operator, WaitReport
from schemas.control import (
    Action,
    Heartbeat,
    OnDemand,
    Progress,
    Rollback,
    Unload,
)
from schemas.rollout import RolloutMark
from schemas.signing import Signer, Verifier, generate_keys

console = Console()
keys_app = typer.Typer(help="Ed25519 keys that sign control commands and status events.", no_args_is_help=True)

AmqpUrl = Annotated[str | None, typer.Option(envvar="HOTSWAP_AMQP_URL", help="broker URL(s), comma separated")]
Namespace = Annotated[str, typer.Option(envvar="HOTSWAP_NAMESPACE", help="prefix of exchange and queue names")]
KeyPath = Annotated[Path, typer.Option("--key", envvar="HOTSWAP_CONTROL_KEY", help="private signing key")]
WorkerKeyPath = Annotated[Path, typer.Option(
    "--worker-key", envvar="HOTSWAP_WORKER_PUBLIC_KEY", help="public key verifying the workers' status events")]
DEFAULT_KEY, DEFAULT_WORKER_KEY = Path("keys/control.key"), Path("keys/worker.pub")
Wait = Annotated[bool, typer.Option("--wait", help="follow every worker to an outcome; non-zero if any fails")]
Timeout = Annotated[float, typer.Option(help="seconds --wait waits for every worker")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="directory for the two key pairs")] = Path("keys"),
) -> None:
    """Write two key pairs: control.key (the CLI signs commands) and control.pub (workers verify them);
    worker.key (workers sign their status events) and worker.pub (the CLI believes only those)."""
    try:
        files = generate_keys(out)
    except FileExistsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"operator: {files.control_key} (keep it secret) and {files.worker_public}")
    console.print(f"workers:  {files.control_public} (HOTSWAP_CONTROL_PUBLIC_KEY) and {files.worker_key} "
                  "(HOTSWAP_WORKER_KEY; found beside control.pub by default; keep it secret)")


def update(
    model: str,
    version: str,
    artifact: Annotated[str | None, typer.Option(help="file:// or http(s):// URI (default: the repository)")] = None,
    sha256: Annotated[str | None, typer.Option(help="sha256 of --artifact")] = None,
    canary: Annotated[float | None, typer.Option(help="send this percent to the new version, keep the rest")] = None,
    standby: Annotated[bool, typer.Option(help="preload and validate only; do not serve yet")] = False,
    new_contract: Annotated[bool, typer.Option(
        help="the version may change the task or the class or keypoint names producers get back "
             "(refused otherwise)")] = False,
    wait: Wait = False, timeout: Timeout = 120.0, as_json: AsJson = False,
    amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap", key: KeyPath = DEFAULT_KEY,
    worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Roll out a new version on every worker: preload → validate → swap → cleanup."""
    try:
        action = update_action(version, artifact=artifact, sha256=sha256, canary=canary, standby=standby,
                               new_contract=new_contract)
    except ValueError as exc:
        raise typer.BadParameter(explain(exc)) from exc
    _send(model, action, wait, timeout, as_json, amqp_url, namespace, key, worker_key)


def rollback(
    model: str,
    to: Annotated[str | None, typer.Option(help="version to go back to (default: the previous one)")] = None,
    wait: Wait = False, timeout: Timeout = 120.0, as_json: AsJson = False,
    amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap", key: KeyPath = DEFAULT_KEY,
    worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Go back to the previous version (instant while it is warm on standby)."""
    _send(model, Rollback(to=to), wait, timeout, as_json, amqp_url, namespace, key, worker_key)


def traffic(
    model: str,
    weights: Annotated[list[str], typer.Argument(help="VERSION=PERCENT ..., adding up to 100")],
    shadow: Annotated[str | None, typer.Option(help="VERSION:PERCENT of jobs also run on VERSION")] = None,
    wait: Wait = False, timeout: Timeout = 120.0, as_json: AsJson = False,
    amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap", key: KeyPath = DEFAULT_KEY,
    worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Split traffic between versions (sticky by routing key), optionally shadowing one."""
    try:
        action = traffic_action(weights, shadow)
    except ValueError as exc:
        raise typer.BadParameter(explain(exc)) from exc
    _send(model, action, wait, timeout, as_json, amqp_url, namespace, key, worker_key)


def unload(
    model: str, version: str,
    wait: Wait = False, timeout: Timeout = 120.0, as_json: AsJson = False,
    amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap", key: KeyPath = DEFAULT_KEY,
    worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Free a standby version on every worker."""
    _send(model, Unload(version=version), wait, timeout, as_json, amqp_url, namespace, key, worker_key)


def on_demand(
    model: str,
    versions: Annotated[str | None, typer.Option(help="VERSION,VERSION,...: versions a pinned job may load; '' "
                                                      "turns it off")] = None,
    max_warm: Annotated[int, typer.Option(min=1, help="on-demand versions kept loaded at most per worker")] = 2,
    idle_unload: Annotated[str, typer.Option(help="unload a version unused this long: 300s, 5m, 1h, 500ms")] = "300s",
    off: Annotated[bool, typer.Option(help="turn loading on demand off (unloads the versions it loaded)")] = False,
    wait: Wait = False, timeout: Timeout = 120.0, as_json: AsJson = False,
    amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap", key: KeyPath = DEFAULT_KEY,
    worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Let jobs pinned to these versions load them on first use (pinned jobs only, least recently
    used evicted beyond --max-warm, unloaded when idle); replaces the model's previous list."""
    if versions is None and not off:
        raise typer.BadParameter("give --versions (or --off)")
    names = [] if off or versions is None else [v.strip() for v in versions.split(",") if v.strip()]
    try:
        action = OnDemand(versions=names, max_warm=max_warm, idle_unload_s=parse_duration(idle_unload))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _send(model, action, wait, timeout, as_json, amqp_url, namespace, key, worker_key)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in `300`, `300s`, `5m`, `1.5h` or `500ms`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (like 300s, 5m, 1h or 500ms)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def status(
    listen: Annotated[float, typer.Option(help="seconds to listen for heartbeats")] = 2.5,
    as_json: AsJson = False, amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap",
    worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """Every live worker × model: active, standby, traffic, state, last error (from heartbeats)."""
    workers = _worker_verifier(worker_key)

    async def run() -> tuple[dict[str, Heartbeat], int]:
        async with Operator(_url(amqp_url), namespace=namespace, workers=workers) as op:
            return await op.heartbeats(listen), sum(op.rejected_events.values())

    beats, rejected = asyncio.run(run())
    _warn_rejected(rejected)
    if as_json:
        print(json.dumps({w: json.loads(h.model_dump_json()) for w, h in sorted(beats.items())}, indent=2))
        return
    console.print(status_table(beats))
    if not beats:
        console.print(f"[yellow]no heartbeat within {listen} s: no worker with a control key is running[/yellow]")


def watch(
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    amqp_url: AmqpUrl = None, namespace: Namespace = "hotswap", worker_key: WorkerKeyPath = DEFAULT_WORKER_KEY,
) -> None:
    """A live view of every worker, refreshed on each heartbeat and progress event."""
    workers = _worker_verifier(worker_key)

    async def run() -> None:
        beats: dict[str, Heartbeat] = {}
        recent: list[Progress] = []
        async with Operator(_url(amqp_url), namespace=namespace, workers=workers) as op, op.events() as events:
            with Live(status_table(beats), console=console, refresh_per_second=4) as live:
                end = time.monotonic() + duration if duration else None
                while end is None or time.monotonic() < end:
                    try:
                        event = await asyncio.wait_for(events.get(), 0.5)
                    except TimeoutError:
                        continue
                    if isinstance(event, Heartbeat):
                        beats[event.worker_id] = event
                    else:
                        recent = [*recent[-7:], event]
                    live.update(status_table(beats, recent))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def status_table(beats: dict[str, Heartbeat], recent: list[Progress] | None = None) -> Table:
    table = Table(title="hotswap workers", title_justify="left")
    for column in ("worker", "model", "active", "standby", "traffic", "shadow", "on demand", "seq", "rollout"):
        table.add_column(column)
    table.add_column("last error", max_width=48, no_wrap=True, overflow="ellipsis")
    for worker, beat in sorted(beats.items()):
        for model, state in sorted(beat.models.items()):
            standby = [v for v, s in state.versions.items() if s.state == "standby"]
            failed = [f"{v} failed" for v, s in state.versions.items() if s.state == "failed"]
            split = ", ".join(f"{v} {s.weight:g}%" for v, s in state.versions.items() if s.weight)
            shadow = f"{state.shadow.version} {state.shadow.percent:g}%" if state.shadow else ""
            warm = ", ".join(f"{v} ({s.state})" for v, s in state.versions.items() if s.on_demand)
            table.add_row(worker, model, state.active or "-", ", ".join(standby) or "-", split, shadow, warm,
                          str(state.last_seq), _rollout_cell(state.rollout), beat.last_error or ", ".join(failed))
    if recent:
        table.caption = " | ".join(f"{p.worker_id} {p.model}#{p.seq} {p.phase}" for p in recent[-4:])
    return table


def _rollout_cell(mark: RolloutMark | None) -> str:
    if mark is None:
        return ""
    plan = mark.plan
    step = f" {plan.steps[mark.step]:g}%" if mark.phase == "canary" else ""
    return f"{mark.rollout_id} {plan.stable}→{plan.candidate} {mark.phase}{step}"


def _worker_verifier(path: Path) -> Verifier:
    if not path.is_file():
        console.print(f"[red]no worker public key at {path}[/red]: it verifies the workers' status events "
                      "(`hotswap keys generate` writes keys/worker.pub), or --worker-key / HOTSWAP_WORKER_PUBLIC_KEY")
        raise typer.Exit(2)
    return Verifier.from_file(path)


def _warn_rejected(count: int) -> None:
    if count:
        console.print(f"[yellow]ignored {count} status event(s) that failed authentication "
                      "(unsigned, another key, or stale): someone else publishes to the status exchange[/yellow]")


def _send(
    model: str, action: Action, wait: bool, timeout: float, as_json: bool,
    amqp_url: str | None, namespace: str, key: Path, worker_key: Path,
) -> None:
    if not key.is_file():
        console.print(f"[red]no signing key at {key}[/red]: `hotswap keys generate`, or --key / HOTSWAP_CONTROL_KEY")
        raise typer.Exit(2)
    signer = Signer.from_file(key)
    workers = _worker_verifier(worker_key) if wait else None

    async def run() -> WaitReport | None:
        async with Operator(_url(amqp_url), namespace=namespace, signer=signer, issuer=issuer(),
                            workers=workers) as op:
            if wait:
                return await op.publish_and_wait(model, action, timeout_s=timeout)
            console.print(published(model, await op.publish(model, action)))
            return None

    report = asyncio.run(run())
    if report is None:
        return
    if as_json:
        print(json.dumps(_report_json(report), indent=2))
    else:
        console.print(_report_table(report))
        _warn_rejected(sum(report.rejected_events.values()))
    if not report.ok:
        for worker in report.missing:
            console.print(f"[red]{worker}: no outcome within {timeout} s[/red]")
        for worker, reason in report.failures.items():
            console.print(f"[red]{worker}: {reason}[/red]")
        if not report.workers:
            console.print("[red]no worker answered: is any running with the control public key?[/red]")
        raise typer.Exit(1)


def _report_table(report: WaitReport) -> Table:
    c = report.command
    table = Table(title=f"{c.action.kind} {c.model} (seq {c.seq})", title_justify="left")
    for column in ("worker", "phases", "outcome", "seconds", "reason"):
        table.add_column(column)
    for worker in report.workers:
        events = report.progress.get(worker, [])
        final = report.final(worker)
        colour = "green" if final and final.phase == "done" else "red"
        table.add_row(
            worker, " → ".join(dict.fromkeys(e.phase for e in events)),
            f"[{colour}]{final.phase if final else 'no answer'}[/{colour}]",
            f"{final.seconds:.2f}" if final and final.seconds is not None else "",
            (final.reason if final else "") or "",
        )
    return table


def _report_json(report: WaitReport) -> dict[str, object]:
    return {
        "command": json.loads(report.command.model_dump_json()),
        "ok": report.ok,
        "workers": {
            w: [json.loads(p.model_dump_json()) for p in report.progress.get(w, [])] for w in report.workers
        },
        "missing": report.missing,
        "failures": report.failures,
        "rejected_events": dict(report.rejected_events),
    }


def _url(amqp_url: str | None) -> str:
    return amqp_url or DEFAULT_AMQP_URL
