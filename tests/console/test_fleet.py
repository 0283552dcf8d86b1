"""The fleet and the timeline, from a real worker's signed events: with the CLI's own commands beside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from console_support import cell, entry, get_state, http, row, running_console, sign_in, wait_for_state

from control import commands
from control.operator import Operator
from schemas.control import Update
from schemas.signing import KeyFiles

if TYPE_CHECKING:
    from conftest import ServeInProcess


async def _events(session: Any, url: str, seen: list[dict[str, Any]]) -> None:
    async with session.get(f"{url}/api/events") as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        async for line in stream.content:
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:]))


async def test_an_update_from_the_cli_shows_up_live_in_the_fleet_and_the_timeline(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-cli")
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        await sign_in(session, console.url)
        state = await wait_for_state(session, console.url, lambda s: row(s, "w-cli", "trivial") is not None)
        fleet = row(state, "w-cli", "trivial")
        assert fleet is not None and (fleet["active"], fleet["weights"]) == ("1.0.0", {"1.0.0": 100.0})
        assert [v["state"] for v in fleet["versions"]] == ["active"] and fleet["in_flight"] == 0

        seen: list[dict[str, Any]] = []
        stream = asyncio.create_task(_events(session, console.url, seen))
        # Exactly as `hotswap update trivial 2.0.0 --wait` runs it (its own event loop, in a thread).
        await asyncio.to_thread(
            commands.update, "trivial", "2.0.0", wait=True, timeout=30, as_json=True, amqp_url=amqp_url,
            namespace=namespace, key=control_keys.control_key, worker_key=control_keys.worker_public)
        state = await wait_for_state(session, console.url, lambda s: (e := entry(s, "update to 2.0.0")) is not None
                                     and e["outcome"] == "done" and cell(s, "w-cli", "trivial", "active") == "2.0.0")
        update = entry(state, "update to 2.0.0")
        assert update is not None and update["issuer"] and not update["issuer"].startswith("console:")
        (worker,) = update["workers"]
        phases = [p["phase"] for p in worker["phases"]]
        assert worker["worker"] == "w-cli" and phases[-1] == "done"
        assert {"preload", "validate", "swap"} <= set(phases), phases
        async with asyncio.timeout(5):  # the stream told it too, without asking
            while not any(entry(s, "update to 2.0.0") and cell(s, "w-cli", "trivial", "active") == "2.0.0"
                          for s in seen):
                await asyncio.sleep(0.05)
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream


async def test_a_failed_update_shows_why_and_earlier_commands_come_from_the_log(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-old")
    before = await operator.publish_and_wait("trivial", Update(version="2.0.0", activate="standby"), timeout_s=30)
    assert before.ok, before.failures
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        await sign_in(session, console.url)
        await wait_for_state(session, console.url, lambda s: entry(s, "update to 2.0.0 (standby)") is not None)
        failed = await operator.publish_and_wait("trivial", Update(version="9.9.9"), timeout_s=30)
        assert not failed.ok
        state = await wait_for_state(session, console.url, lambda s: (e := entry(s, "update to 9.9.9")) is not None
                                     and e["outcome"] == "failed")
        update = entry(state, "update to 9.9.9")
        assert update is not None
        (worker,) = update["workers"]
        assert worker["outcome"] == "failed" and worker["reason"] == failed.failures["w-old"].split(": ", 1)[1]
        fleet = row(await get_state(session, console.url), "w-old", "trivial")
        assert fleet is not None and fleet["active"] == "1.0.0" and fleet["standby"] == ["2.0.0"]
