"""The console's web application: pages, the live state as server-sent events, sign-in.

    app = create_app(ConsoleSettings())   # `hotswap console` runs it (web.run_app)

On start-up it connects as the CLI does: an `Operator` (signing with the operator key when this
host has it; following only status events signed by the worker key) and a `Client` for Try it.
The pages are plain HTML with one script and one style sheet (`console/static`), no build step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

from aiohttp import web

from console.actions import Changes
from console.auth import COOKIE, SESSION, Session, Sessions, guard, secret_matches, security_headers, start_session
from console.fleet import FleetView
from console.settings import ConsoleSettings
from console.tryit import TryIt
from control.actions import issuer
from control.client import Client
from control.operator import Operator
from schemas.signing import Signer, Verifier

STATIC = Path(str(files("console") / "static"))
PAGES = {"/": ("fleet", "Fleet"), "/updates": ("updates", "Updates"), "/try": ("try", "Try it")}
#: Seconds between comments on an idle event stream: proxies close a silent connection.
KEEPALIVE_S = 15.0

SETTINGS = web.AppKey("settings", ConsoleSettings)
SESSIONS = web.AppKey("sessions", Sessions)
VIEW = web.AppKey("view", FleetView)
OPERATOR = web.AppKey("operator", Operator)
STOPPING = web.AppKey("stopping", asyncio.Event)
ACCEPTED: web.AppKey[list[bytes]] = web.AppKey("accepted")


class MissingKey(ValueError):
    """The worker key that verifies status events is needed to show anything."""


def create_app(settings: ConsoleSettings) -> web.Application:
    accepted = settings.secrets()  # NoSecret here, at start, rather than a console nobody can use
    if not settings.worker_public_key.is_file():
        raise MissingKey(f"no worker public key at {settings.worker_public_key}: it verifies the workers' status "
                         "events (`hotswap keys generate` writes keys/worker.pub), or HOTSWAP_WORKER_PUBLIC_KEY")
    sessions = Sessions(settings.console_session_ttl_s)
    middlewares = [security_headers, guard(sessions, anonymous_view=settings.console_anonymous_view)]
    app = web.Application(middlewares=middlewares, client_max_size=settings.console_max_upload_bytes + 64 * 1024)
    app[SETTINGS], app[SESSIONS], app[STOPPING] = settings, sessions, asyncio.Event()
    signer = Signer.from_file(settings.control_key) if settings.control_key.is_file() else None
    operator = Operator(settings.amqp_url, namespace=settings.namespace, signer=signer, issuer=issuer("console:"),
                        workers=Verifier.from_file(settings.worker_public_key))
    view = FleetView(operator, stale_after_s=settings.console_stale_after_s, timeline=settings.console_timeline)
    app[OPERATOR], app[VIEW] = operator, view
    changes = Changes(operator, view)
    client = Client(settings.amqp_url, namespace=settings.namespace, timeout_s=settings.console_job_timeout_s,
                    connection_name="hotswap-console")
    tryit = TryIt(client, view, max_bytes=settings.console_max_upload_bytes,
                  max_pixels=settings.console_max_image_pixels, timeout_s=settings.console_job_timeout_s)

    async def connected(app: web.Application) -> AsyncIterator[None]:
        async with operator, client:
            following = asyncio.create_task(view.run())
            await _started(view, following)
            yield
            app[STOPPING].set()
            await changes.close()
            view.stop()
            try:
                await asyncio.wait_for(asyncio.shield(following), 15)
            except TimeoutError:  # a read of the log that never ends: cut off after all
                following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following

    async def stop_streams(app: web.Application) -> None:
        app[STOPPING].set()  # before aiohttp waits for the handlers: the event streams end at once
        view.changed()

    app.cleanup_ctx.append(connected)
    app.on_shutdown.append(stop_streams)
    app.add_routes([web.get("/login", login_page), web.post("/login", login), web.post("/logout", logout),
                    *(web.get(path, page) for path in PAGES),
                    web.get("/api/state", state), web.get("/api/events", events),
                    web.post("/api/try", tryit.handle), *changes.routes(),
                    web.static("/static", STATIC, show_index=False)])
    app[ACCEPTED] = accepted
    return app


async def _started(view: FleetView, following: asyncio.Task[None]) -> None:
    """Wait until the view follows the events: a console that cannot follow them fails at start."""
    waiting = asyncio.create_task(view.started.wait())
    await asyncio.wait({waiting, following}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if following.done():
        following.result()


def _render(name: str, title: str, session: Session | None, **values: str) -> str:
    shell = (STATIC / "shell.html").read_text()
    body = (STATIC / f"{name}.html").read_text()
    for key, value in values.items():
        body = body.replace(f"{{{{{key}}}}}", value)
    who = ("signed in" if session else "" if name == "login"
           else "read-only viewer: <a href=\"/login\">sign in</a> to change anything")
    return (shell.replace("{{page}}", name).replace("{{title}}", title).replace("{{who}}", who)
            .replace("{{csrf}}", session.csrf if session else "").replace("{{body}}", body))


async def page(request: web.Request) -> web.Response:
    name, title = PAGES[request.path]
    return web.Response(text=_render(name, title, request.get(SESSION)), content_type="text/html")


async def login_page(request: web.Request, *, message: str = "", status: int = 200) -> web.Response:
    text = _render("login", "Sign in", None, message=message)
    return web.Response(text=text, content_type="text/html", status=status)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    given = form.get("secret")
    accepted = request.app[ACCEPTED]
    if not isinstance(given, str) or not accepted or not secret_matches(given, accepted):
        return await login_page(request, message="Wrong token or password.", status=401)
    settings = request.app[SETTINGS]
    session = request.app[SESSIONS].open()
    response = web.HTTPSeeOther("/")
    start_session(response, session, secure=settings.console_secure_cookie, ttl_s=settings.console_session_ttl_s)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    session: Session | None = request.get(SESSION)
    if session is not None:
        request.app[SESSIONS].close(session.session_id)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


def _state_json(request: web.Request) -> str:
    state = request.app[VIEW].state()
    state["signed_in"] = request.get(SESSION) is not None
    state["can_sign"] = request.app[OPERATOR].signer is not None
    return json.dumps(state)


async def state(request: web.Request) -> web.Response:
    return web.Response(text=_state_json(request), content_type="application/json")


async def events(request: web.Request) -> web.StreamResponse:
    """The state on connecting and after every change, as `state` events (EventSource)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    stopping = request.app[STOPPING]
    with request.app[VIEW].subscribe() as wakes:
        await response.write(f"event: state\ndata: {_state_json(request)}\n\n".encode())
        while not stopping.is_set():
            try:
                await asyncio.wait_for(wakes.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await asyncio.sleep(0.1)  # a burst of heartbeats goes out as one state
            await response.write(f"event: state\ndata: {_state_json(request)}\n\n".encode())
    return response


def run(settings: ConsoleSettings) -> None:
    web.run_app(create_app(settings), host=settings.console_host, port=settings.console_port, access_log=None)
