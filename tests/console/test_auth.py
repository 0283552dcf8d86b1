"""Sign-in, sessions and CSRF, over plain HTTP against a real console on the real broker."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from console_support import TOKEN, csrf_of, http, running_console, sign_in

from console.auth import COOKIE
from console.server import SESSIONS
from console.settings import ConsoleSettings, NoSecret
from control.operator import Operator
from schemas.signing import KeyFiles


async def test_nothing_but_the_sign_in_page_without_a_session(
    amqp_url: str, namespace: str, control_keys: KeyFiles
) -> None:
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        for path in ("/", "/updates", "/try"):
            async with session.get(console.url + path, allow_redirects=False) as page:
                assert (page.status, page.headers["Location"]) == (303, "/login"), path
        for path in ("/api/state", "/api/events"):
            async with session.get(console.url + path) as api:
                assert api.status == 401 and "sign in first" in (await api.json())["error"]
        async with session.get(console.url + "/login") as login:
            assert login.status == 200 and 'name="secret"' in await login.text()
            assert "frame-ancestors 'none'" in login.headers["Content-Security-Policy"]
        async with session.get(console.url + "/static/console.js") as script:
            assert script.status == 200


async def test_a_wrong_token_gets_nothing_and_changes_nothing(
    amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator
) -> None:
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        async with session.post(console.url + "/login", data={"secret": TOKEN + "x"}, allow_redirects=False) as bad:
            assert bad.status == 401 and "Wrong token or password." in await bad.text()
            assert COOKIE not in bad.cookies
        async with session.get(console.url + "/api/state") as state:
            assert state.status == 401
        async with session.post(console.url + "/api/update", data={"model": "trivial", "version": "2.0.0"}) as post:
            assert post.status == 401 and "nothing was changed" in (await post.json())["error"]
        assert len(console.app[SESSIONS]) == 0
    assert await operator.read_log() == []


async def test_a_session_cookie_is_httponly_strict_and_expires(
    amqp_url: str, namespace: str, control_keys: KeyFiles
) -> None:
    async with running_console(amqp_url, namespace, control_keys, console_session_ttl_s=600) as console, \
            http() as session:
        async with session.post(console.url + "/login", data={"secret": TOKEN}, allow_redirects=False) as ok:
            assert ok.status == 303
            cookie = ok.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=600" in cookie, cookie
        async with session.get(console.url + "/", allow_redirects=False) as page:
            assert page.status == 200 and "signed in" in await page.text()
        sessions = console.app[SESSIONS]
        started = sessions.clock()
        sessions.clock = lambda: started + 601  # ten minutes and a second later
        async with session.get(console.url + "/", allow_redirects=False) as later:
            assert (later.status, later.headers["Location"]) == (303, "/login")
        assert len(sessions) == 0


async def test_a_post_without_the_sessions_csrf_token_is_refused(
    amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator
) -> None:
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        csrf = await sign_in(session, console.url)
        form = {"model": "trivial", "version": "2.0.0"}
        async with session.post(console.url + "/api/update", data=form) as forged:  # the cookie alone
            assert forged.status == 403 and "CSRF token" in (await forged.json())["error"]
        other = ("B" if csrf[0] == "A" else "A") + csrf[1:]  # not the last: it carries 4 bits only
        async with session.post(console.url + "/api/update", data={**form, "csrf": other}) as wrong:
            assert wrong.status == 403
        async with session.post(console.url + "/logout", allow_redirects=False) as logout:
            assert logout.status == 403  # still signed in
        async with session.post(console.url + "/logout", data={"csrf": csrf}, allow_redirects=False) as logout:
            assert logout.status == 303
        async with session.get(console.url + "/", allow_redirects=False) as page:
            assert page.status == 303
    assert await operator.read_log() == []


async def test_secrets_and_csrf_tokens_are_compared_in_constant_time(
    amqp_url: str, namespace: str, control_keys: KeyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with running_console(amqp_url, namespace, control_keys) as console, http() as session:
        csrf = await sign_in(session, console.url)
        assert len(compared) == 1 and all(len(x) == 32 for x in compared[0])  # digests: no length shows
        async with session.post(console.url + "/api/rollback", data={"model": "nope"},
                                headers={"X-CSRF-Token": csrf}) as checked:
            assert checked.status == 404  # past the CSRF check, refused for the model
        assert len(compared) == 2


async def test_read_only_viewers_only_where_a_setting_says_so(
    amqp_url: str, namespace: str, control_keys: KeyFiles, tmp_path: Path
) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    async with running_console(amqp_url, namespace, control_keys, console_anonymous_view=True,
                               console_password_file=password) as console, http() as session:
        async with session.get(console.url + "/", allow_redirects=False) as page:
            assert page.status == 200 and "read-only viewer" in await page.text()
        async with session.get(console.url + "/api/state") as state:
            assert state.status == 200 and (await state.json())["signed_in"] is False
        async with session.post(console.url + "/api/traffic", data={"model": "trivial"}) as change:
            assert change.status == 401
        await sign_in(session, console.url, "s3cret")  # the password file's first line signs in too
        assert await csrf_of(session, console.url)
    with pytest.raises(NoSecret):
        ConsoleSettings(console_token=None, console_password_file=None, console_anonymous_view=False).secrets()
