"""What the console shows, from the authenticated status events alone (`Operator.events`: signed by
the worker key, and recent) and the signed control log (`Operator.read_log`): the fleet, each
live worker × model, and the timeline of commands with each worker's phases through them.

Pages follow it through `subscribe()`: a queue woken on every change, coalesced (one pending wake
at most), so a slow browser never makes the console hold more than one state for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from control.operator import FINAL_PHASES, Operator
from schemas.control import Command, Heartbeat, ModelStatus, Progress

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One command of the timeline: what it was (once the log has told), and each worker's phases."""

    command_id: str
    model: str
    seq: int
    first_seen: float
    command: Command | None = None
    progress: dict[str, list[Progress]] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        workers = []
        for worker, events in sorted(self.progress.items()):
            final = next((p for p in reversed(events) if p.phase in FINAL_PHASES), None)
            workers.append({
                "worker": worker, "outcome": final.phase if final else "running",
                "reason": final.reason if final else None,
                "phases": [{"phase": p.phase, "at": p.at.isoformat(), "seconds": p.seconds, "reason": p.reason}
                           for p in events],
            })
        outcomes = {w["outcome"] for w in workers}
        c = self.command
        return {
            "command_id": self.command_id, "model": self.model, "seq": self.seq,
            "kind": c.action.kind if c else "?", "summary": describe(c) if c else "(not in the log yet)",
            "issuer": c.issuer if c else None, "issued_at": c.issued_at.isoformat() if c else None,
            "outcome": ("running" if "running" in outcomes else "failed" if outcomes - {"done"} else "done")
            if workers else "no worker reported",
            "workers": workers,
        }


def describe(command: Command) -> str:
    a = command.action
    match a.kind:
        case "update":
            text = f"update to {a.version}" + (f" ({a.activate}" + (f" {a.canary_percent:g}%" if a.canary_percent
                                                                    else "") + ")" if a.activate != "now" else "")
        case "rollback":
            text = f"rollback to {a.to or 'the previous version'}"
        case "traffic":
            text = "traffic " + ", ".join(f"{v} {w:g}%" for v, w in a.weights.items()) + (
                f", shadow {a.shadow.version} {a.shadow.percent:g}%" if a.shadow else "")
        case "unload":
            text = f"unload {a.version}"
        case _:
            text = f"on demand: {', '.join(a.versions) or 'off'}"
    mark = command.rollout
    return text + (f" — rollout {mark.rollout_id} {mark.phase}" if mark else "")


def fleet_rows(worker: str, beat: Heartbeat, heard_s_ago: float) -> list[dict[str, Any]]:
    return [_row(worker, model, state, beat.last_error, heard_s_ago) for model, state in sorted(beat.models.items())]


def _row(worker: str, model: str, state: ModelStatus, last_error: str | None, heard: float) -> dict[str, Any]:
    versions = state.versions
    failed = [f"{v} failed: {s.reason}" for v, s in versions.items() if s.state == "failed"]
    mark = state.rollout
    return {
        "worker": worker, "model": model, "active": state.active,
        "standby": [v for v, s in versions.items() if s.state == "standby"],
        "weights": {v: s.weight for v, s in versions.items() if s.weight},
        "shadow": f"{state.shadow.version} {state.shadow.percent:g}%" if state.shadow else None,
        "versions": [{"version": v, "state": s.state, "reason": s.reason, "weight": s.weight,
                      "in_flight": s.in_flight, "on_demand": s.on_demand} for v, s in sorted(versions.items())],
        "in_flight": sum(s.in_flight for s in versions.values()),
        "last_seq": state.last_seq,
        "rollout": f"{mark.rollout_id} {mark.plan.stable}→{mark.plan.candidate} {mark.phase}" if mark else None,
        "last_error": last_error or "; ".join(failed) or None,
        "heard_s_ago": round(heard, 1),
    }


@dataclass
class RolloutRun:
    """A rollout this console runs: what it said, as `hotswap rollout` prints it."""

    model: str
    lines: list[str] = field(default_factory=list)
    running: bool = True


class FleetView:
    def __init__(self, operator: Operator, *, stale_after_s: float = 10.0, timeline: int = 50,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.operator = operator
        self.stale_after_s = stale_after_s
        self.timeline = timeline
        self.clock = clock
        self.beats: dict[str, tuple[Heartbeat, float]] = {}
        self.entries: dict[str, Entry] = {}
        self.rollouts: dict[str, RolloutRun] = {}
        self._subscribers: set[asyncio.Queue[None]] = set()
        self._log_wanted = asyncio.Event()
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Follow the status events, and the log for the commands they name; until `stop()`.

        Stopped rather than cancelled: a read of the log cancelled halfway (aio-pika's channel
        open or close cut off) has left its connection unusable here, and the close waiting for
        ever; stopping lets a read in progress finish first."""
        async with self.operator.events() as events, asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_log())
            self._log_wanted.set()  # the history, once
            self.started.set()
            while not self.stopping.is_set():
                try:
                    event = await asyncio.wait_for(events.get(), 0.25)  # an asyncio queue: safe to cut off
                except TimeoutError:
                    event = None
                if event is not None:
                    self.observe(event)
                self._prune()

    def stop(self) -> None:
        self.stopping.set()
        self._log_wanted.set()

    def observe(self, event: Progress | Heartbeat) -> None:
        now = self.clock()
        if isinstance(event, Heartbeat):
            held = self.beats.get(event.worker_id)
            if held is None or held[0].at <= event.at:  # one arriving late says less than the one we have
                self.beats[event.worker_id] = (event, now)
        else:
            entry = self.entries.get(event.command_id)
            if entry is None:
                entry = self.entries[event.command_id] = Entry(event.command_id, event.model, event.seq, time.time())
                self._trim()
            if entry.command is None:
                self._log_wanted.set()
            entry.progress.setdefault(event.worker_id, []).append(event)
        self.changed()

    def add_commands(self, commands: list[Command]) -> None:
        for command in commands:
            entry = self.entries.get(command.command_id)
            if entry is None:
                entry = self.entries[command.command_id] = Entry(
                    command.command_id, command.model, command.seq, command.issued_at.timestamp())
            entry.command = command
        self._trim()
        self.changed()

    def _trim(self) -> None:
        for old in sorted(self.entries.values(), key=lambda e: e.first_seen)[:-self.timeline]:
            del self.entries[old.command_id]

    async def _follow_log(self) -> None:
        if self.operator.signer is None:
            return  # the log is read with the operator's key; without it the timeline names commands by seq
        while True:
            await self._log_wanted.wait()
            self._log_wanted.clear()
            if self.stopping.is_set():
                return
            try:
                self.add_commands(await self.operator.read_log(timeout_s=10))
            except Exception as exc:  # the timeline waits for the next try; the fleet goes on
                log.warning("reading the control log failed: %s", exc)
                await asyncio.sleep(1.0)

    def _prune(self) -> None:
        now = self.clock()
        gone = [w for w, (_, heard) in self.beats.items() if now - heard > self.stale_after_s]
        for worker in gone:
            del self.beats[worker]
        if gone:
            self.changed()

    def changed(self) -> None:
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):  # one wake pending is enough
                queue.put_nowait(None)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[None]]:
        queue: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def models(self) -> dict[str, list[str]]:
        """Every model a live worker serves, with the versions it holds."""
        found: dict[str, set[str]] = {}
        for beat, _ in self.beats.values():
            for model, state in beat.models.items():
                found.setdefault(model, set()).update(state.versions)
        return {m: sorted(v) for m, v in sorted(found.items())}

    def state(self) -> dict[str, Any]:
        now = self.clock()
        rows = [row for worker, (beat, heard) in sorted(self.beats.items())
                for row in fleet_rows(worker, beat, now - heard)]
        newest = sorted(self.entries.values(), key=lambda e: (e.first_seen, e.seq), reverse=True)
        return {
            "fleet": rows, "models": self.models(),
            "updates": [e.json() for e in newest[:self.timeline]],
            "rollouts": [{"model": r.model, "running": r.running, "lines": r.lines[-40:]}
                         for r in self.rollouts.values()],
            "rejected_events": sum(self.operator.rejected_events.values()),
        }
