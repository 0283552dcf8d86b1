"""A real console (`console.server.create_app`) on a free port of this host, in the test's event loop,
against the real broker; and an HTTP client signed in to it as a browser would be."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from console.server import create_app
from console.settings import ConsoleSettings
from schemas.signing import KeyFiles

TOKEN = "correct horse battery staple"


@dataclass
class RunningConsole:
    url: str
    app: web.Application


@asynccontextmanager
async def running_console(amqp_url: str, namespace: str, keys: KeyFiles, **settings: Any) -> AsyncIterator[
        RunningConsole]:
    config = ConsoleSettings(amqp_url=amqp_url, namespace=namespace, control_key=keys.control_key,
                             worker_public_key=keys.worker_public, console_token=SecretStr(TOKEN), **settings)
    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield RunningConsole(f"http://127.0.0.1:{port}", runner.app)
    finally:
        await runner.cleanup()


def http() -> aiohttp.ClientSession:
    # unsafe: aiohttp keeps no cookie for an IP address otherwise; redirects shown, not followed.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(session: aiohttp.ClientSession, url: str, secret: str = TOKEN) -> str:
    """Sign in; the session's CSRF token, read off a page as the page's script reads it."""
    async with session.post(f"{url}/login", data={"secret": secret}, allow_redirects=False) as response:
        assert response.status == 303, await response.text()
    return await csrf_of(session, url)


async def csrf_of(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/updates", allow_redirects=False) as response:
        assert response.status == 200
        match = re.search(r'<meta name="csrf" content="([^"]+)">', await response.text())
    assert match is not None
    return match.group(1)


async def get_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/api/state") as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def wait_for_state(session: aiohttp.ClientSession, url: str, check: Callable[[dict[str, Any]], bool],
                         timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = await get_state(session, url)
        if check(state):
            return state
        assert time.monotonic() < deadline, f"the console never showed it; last state: {state}"
        await asyncio.sleep(0.1)


def row(state: dict[str, Any], worker: str, model: str) -> dict[str, Any] | None:
    return next((r for r in state["fleet"] if r["worker"] == worker and r["model"] == model), None)


def entry(state: dict[str, Any], summary: str) -> dict[str, Any] | None:
    return next((u for u in state["updates"] if u["summary"] == summary), None)


def cell(state: dict[str, Any], worker: str, model: str, column: str) -> Any:
    """One column of a fleet row; None while the row is not there."""
    found = row(state, worker, model)
    return found[column] if found is not None else None


@dataclass
class SignedIn:
    console: RunningConsole
    session: aiohttp.ClientSession
    csrf: dict[str, str]  # the header every POST of the session carries


@asynccontextmanager
async def signed_in_beside(amqp_url: str, namespace: str, keys: KeyFiles, worker: str,
                           model: str = "trivial") -> AsyncIterator[SignedIn]:
    """A console, a session signed in to it, once the fleet shows `worker` serving `model`."""
    async with running_console(amqp_url, namespace, keys) as console, http() as session:
        csrf = {"X-CSRF-Token": await sign_in(session, console.url)}
        await wait_for_state(session, console.url, lambda s: row(s, worker, model) is not None)
        yield SignedIn(console, session, csrf)
