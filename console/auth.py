"""Who may see and change what: sign-in with a token or password, server-side sessions, CSRF.

A session lives here only (its id in an HttpOnly, SameSite=Strict cookie) and ends `ttl_s` after
sign-in. Every request that is not a GET (or HEAD) must carry the session's CSRF token, in the
`X-CSRF-Token` header (the page's script) or a `csrf` form field: a form another site makes a
browser post has neither, and SameSite=Strict keeps the cookie off it too. Secrets and tokens are
compared in constant time (`hmac.compare_digest`), on digests, so not even their length shows.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

COOKIE = "hotswap_console"
CSRF_HEADER = "X-CSRF-Token"
#: Paths anyone may reach: the sign-in page, and what it needs to render.
PUBLIC_PATHS = frozenset({"/login"})
PUBLIC_PREFIXES = ("/static/",)
SAFE_METHODS = frozenset({"GET", "HEAD"})
#: The request's session, set by `guard` (None: nobody signed in).
SESSION: web.RequestKey[Session | None] = web.RequestKey("session")
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})



@dataclass(frozen=True)
class Session:
    session_id: str
    csrf: str
    expires_at: float


class Sessions:
    """Sessions by id, each ending `ttl_s` after it began (`clock`: monotonic seconds)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def open(self) -> Session:
        now = self.clock()
        for sid in [s.session_id for s in self._sessions.values() if s.expires_at <= now]:
            del self._sessions[sid]  # swept at each sign-in: the table stays as small as the live sessions
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl_s)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= self.clock():
            del self._sessions[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def same_secret(given: str | bytes, expected: str | bytes) -> bool:
    """Constant time, on sha256 digests: equal lengths always, so the length of a secret never shows."""
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(hashlib.sha256(a).digest(), hashlib.sha256(b).digest())


def secret_matches(given: str, accepted: list[bytes]) -> bool:
    # Every accepted secret is compared, matched or not: which one matched takes no less time.
    return [same_secret(given, secret) for secret in accepted].count(True) > 0


def refusal(status: int, message: str) -> web.Response:
    """A 4xx whose text says what was refused (the page's script shows `error`)."""
    return web.json_response({"error": message}, status=status)


def guard(sessions: Sessions, *, anonymous_view: bool) -> Middleware:
    """The middleware: a session for everything but the sign-in page (reading alone without one when
    `anonymous_view`), and the session's CSRF token on everything that is not a GET."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        session = sessions.get(request.cookies.get(COOKIE))
        request[SESSION] = session
        if request.method in SAFE_METHODS:
            if session is None and not anonymous_view:
                if request.path.startswith("/api/"):
                    return refusal(401, "sign in first: this console shows nothing without a session")
                raise web.HTTPSeeOther("/login")
            return await handler(request)
        if session is None:
            return refusal(401, "sign in first: changes need a session (nothing was changed)")
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.content_type in FORM_TYPES:
            field = (await request.post()).get("csrf")  # kept by aiohttp: the handler reads the form again
            given = field if isinstance(field, str) else None
        if given is None or not same_secret(given, session.csrf):
            return refusal(403, "refused: the request did not carry this session's CSRF token (a form posted "
                                "from another page?); nothing was changed")
        return await handler(request)

    return middleware


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No framing (clickjacking), no script or style from anywhere but the console itself."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and aiohttp's own 404s go out with them too
        _protect(exc.headers)
        raise
    if not response.prepared:  # an event stream has sent its headers already
        _protect(response.headers)
    return response


def _protect(headers: MutableMapping[str, str]) -> None:
    headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                       "frame-ancestors 'none'; form-action 'self'")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")


def start_session(response: web.StreamResponse, session: Session, *, secure: bool, ttl_s: float) -> None:
    response.set_cookie(COOKIE, session.session_id, max_age=int(ttl_s), path="/", httponly=True,
                        samesite="Strict", secure=secure)
