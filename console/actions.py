"""Change what runs, from the console's forms: update, rollback, traffic and shadow, rollout.

Each form is turned into its action by the CLI's own code (`control.actions`, `control.rollout_cli`)
and published by the same `Operator`, signed with the operator key on this host: the same rules
refuse the same things, with the same words. The console adds one rule of its own: a model no live
worker serves is refused (a typo would otherwise sit in the log until such a worker starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from typing import Any

import typer
from aiohttp import web
from multidict import MultiDictProxy
from rich.errors import MarkupError
from rich.text import Text

from console.auth import refusal
from console.fleet import FleetView, RolloutRun
from control import rollout_cli
from control.actions import explain, published, traffic_action, update_action
from control.operator import Operator
from control.rollout import Outcome, Rollout, RolloutError, Say
from schemas.control import Action, Rollback
from schemas.rollout import RolloutPlan

log = logging.getLogger(__name__)
Form = MultiDictProxy[str | bytes | bytearray | web.FileField]


class BadForm(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _text(form: Form, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def _number(form: Form, name: str) -> float | None:
    text = _text(form, name)
    try:
        return float(text) if text else None
    except ValueError as exc:
        raise BadForm(400, f"{name}: {text!r} is not a number") from exc


def _cli_default(name: str) -> object:
    """A rollout option's default, read off `hotswap rollout` itself: one place says what it is."""
    return inspect.signature(rollout_cli.rollout).parameters[name].default


#: The options of `hotswap rollout` a plan is made of (`rollout_cli.plan_limits`); the form sets four.
_ROLLOUT_OPTIONS = ("shadow", "steps", "interval", "step_timeout", "min_samples", "min_agreement", "max_error_rate",
                    "max_latency_ratio", "latency_slack", "confidence")


def _plain(line: str) -> str:
    with contextlib.suppress(MarkupError):
        return Text.from_markup(line).plain  # the rollout speaks rich markup to a terminal
    return line


class Changes:
    def __init__(self, operator: Operator, view: FleetView) -> None:
        self.operator = operator
        self.view = view
        self.running: dict[str, asyncio.Task[Outcome]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/update", self.update), web.post("/api/rollback", self.rollback),
                web.post("/api/traffic", self.traffic), web.post("/api/rollout", self.rollout),
                web.post("/api/rollout/abort", self.abort)]

    async def _form(self, request: web.Request) -> tuple[Form, str]:
        form = await request.post()
        model = _text(form, "model")
        serving = self.view.models()
        if model not in serving:
            raise BadForm(404, f"unknown model {model!r}: no live worker serves it (serving: "
                               f"{', '.join(serving) or 'nothing'}); nothing was changed")
        return form, model

    async def _publish(self, request: web.Request) -> web.Response:
        try:
            form, model = await self._form(request)
            action = self._action(request.path, form)
            command = await self.operator.publish(model, action)
        except BadForm as exc:
            return refusal(exc.status, str(exc))
        except ValueError as exc:  # the CLI's rules (ValidationError too), or no signing key
            return refusal(400 if self.operator.signer else 503, f"{explain(exc)}; nothing was changed")
        self.view.add_commands([command])
        log.info("console: %s", published(model, command))
        return web.json_response({"message": published(model, command), "command_id": command.command_id})

    def _action(self, path: str, form: Form) -> Action:
        if path == "/api/update":
            activate = _text(form, "activate") or "now"
            return update_action(
                _text(form, "version"), artifact=_text(form, "artifact") or None, sha256=_text(form, "sha256") or None,
                canary=_number(form, "canary") if activate == "canary" else None, standby=activate == "standby",
                new_contract=_text(form, "new_contract") in ("on", "true", "1"))
        if path == "/api/rollback":
            return Rollback(to=_text(form, "to") or None)
        return traffic_action(re.split(r"[\s,]+", _text(form, "weights")), _text(form, "shadow") or None)

    async def update(self, request: web.Request) -> web.Response:
        return await self._publish(request)

    async def rollback(self, request: web.Request) -> web.Response:
        return await self._publish(request)

    async def traffic(self, request: web.Request) -> web.Response:
        return await self._publish(request)

    async def rollout(self, request: web.Request) -> web.Response:
        """Start `hotswap rollout MODEL VERSION` here; it runs on, its lines on the Updates page."""
        try:
            form, model = await self._form(request)
            if model in self.running and not self.running[model].done():
                raise BadForm(409, f"a rollout of {model} is running from this console already")
            # What the form leaves out is what `hotswap rollout` leaves out: the CLI's defaults.
            options: dict[str, Any] = {name: _cli_default(name) for name in _ROLLOUT_OPTIONS}
            options.update({name: value for name in ("shadow", "min_samples") if (value := _number(form, name))
                            is not None})
            options.update({name: text for name in ("steps", "interval") if (text := _text(form, name))})
            limits = rollout_cli.plan_limits(**{**options, "min_samples": int(options["min_samples"])})
            stable = _text(form, "stable") or await rollout_cli.active_version(self.operator, model,
                                                                              self.operator.settle_s)
            plan = RolloutPlan.model_validate({"stable": stable, "candidate": _text(form, "version"), **limits})
            if self.operator.signer is None:
                raise ValueError("publishing a command needs the private key (hotswap keys generate)")
        except BadForm as exc:
            return refusal(exc.status, str(exc))
        except (ValueError, RolloutError, typer.BadParameter) as exc:
            text = exc.message if isinstance(exc, typer.BadParameter) else explain(exc) if isinstance(
                exc, ValueError) else str(exc)
            return refusal(400, f"{text}; nothing was changed")
        run = self.view.rollouts[model] = RolloutRun(model)
        runner = Rollout(self.operator, model, plan, say=self._say(run), settle_s=self.operator.settle_s)
        self.running[model] = task = asyncio.create_task(runner.run())
        task.add_done_callback(lambda done: self._finished(run, done))
        return web.json_response({"message": f"rollout of {model}: {plan.stable} → {plan.candidate} started"},
                                 status=202)

    async def abort(self, request: web.Request) -> web.Response:
        """`hotswap rollout MODEL --abort`: traffic back on stable on every worker."""
        try:
            _, model = await self._form(request)
        except BadForm as exc:
            return refusal(exc.status, str(exc))
        task = self.running.pop(model, None)
        if task is not None and not task.done():
            task.cancel()  # this console's runner stops stepping before the abort is published
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        run = self.view.rollouts.setdefault(model, RolloutRun(model))
        run.running = True
        try:
            outcome = await rollout_cli.continue_rollout(self.operator, model, True, self.operator.settle_s,
                                                         self._say(run))
        except (RolloutError, ValueError) as exc:
            if not run.lines:
                del self.view.rollouts[model]  # nothing to show of a rollout that never was
            return refusal(409, f"{exc}; nothing was changed")
        finally:
            run.running = False
            self.view.changed()
        return web.json_response({"message": outcome.reason or f"rollout of {model} aborted"})

    def _say(self, run: RolloutRun) -> Say:
        def say(line: str) -> None:
            run.lines.append(_plain(line))
            self.view.changed()

        return say

    def _finished(self, run: RolloutRun, task: asyncio.Task[Outcome]) -> None:
        run.running = False
        if task.cancelled():
            run.lines.append("stopped by an abort from the console")
        elif (exc := task.exception()) is not None:
            run.lines.append(f"the rollout stopped: {exc}")
        else:
            outcome = task.result()
            run.lines.append("promoted" if outcome.promoted else f"aborted ({outcome.gate}): {outcome.reason}")
        self.view.changed()

    async def close(self) -> None:
        for task in self.running.values():
            task.cancel()
        for task in self.running.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
