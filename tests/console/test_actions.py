"""Changing what runs from the console: the CLI's rules and words; bad input refused, nothing changed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from console_support import cell, entry, get_state, row, signed_in_beside, wait_for_state

from control.operator import Operator
from schemas.signing import KeyFiles

if TYPE_CHECKING:
    from conftest import ServeInProcess


def _upload(model: str, data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData({"model": model})
    form.add_field("image", data, filename="notes.pdf")
    return form


async def test_update_rollback_and_traffic_from_the_forms(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-forms")
    async with signed_in_beside(amqp_url, namespace, control_keys, "w-forms") as signed:
        console, session, csrf = signed.console, signed.session, signed.csrf
        async with session.post(console.url + "/api/update", headers=csrf,
                                data={"model": "trivial", "version": "2.0.0"}) as update:
            assert update.status == 200, await update.text()
            assert (await update.json())["message"].startswith("published update for trivial as seq 1 (")
        await wait_for_state(session, console.url, lambda s: cell(s, "w-forms", "trivial", "active") == "2.0.0")
        async with session.post(console.url + "/api/rollback", headers=csrf, data={"model": "trivial"}) as back:
            assert back.status == 200, await back.text()
        await wait_for_state(session, console.url, lambda s: cell(s, "w-forms", "trivial", "active") == "1.0.0")
        async with session.post(console.url + "/api/traffic", headers=csrf,
                                data={"model": "trivial", "weights": "1.0.0=75 2.0.0=25", "shadow": "2.0.0:10"}) as t:
            assert t.status == 200, await t.text()
        state = await wait_for_state(session, console.url,
                                     lambda s: cell(s, "w-forms", "trivial", "weights") == {"1.0.0": 75, "2.0.0": 25})
        fleet = row(state, "w-forms", "trivial")
        assert fleet is not None and fleet["shadow"] == "2.0.0 10%"
        assert entry(state, "traffic 1.0.0 75%, 2.0.0 25%, shadow 2.0.0 10%") is not None
        assert entry(state, "rollback to the previous version") is not None
    log = await operator.read_log()
    assert [c.action.kind for c in log] == ["update", "rollback", "traffic"]
    assert {c.issuer.split("@")[0].split(":")[0] for c in log} == {"console"}  # who signed, in the log


async def test_the_cli_rules_refuse_with_the_cli_words_and_nothing_changes(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-rules")
    refused = {
        "/api/traffic": ({"weights": "1.0.0=90 2.0.0=20"}, "weights are percentages ≥ 0 that add up to 100"),
        "/api/traffic ": ({"weights": "1.0.0:90"}, "weights look like 1.0.0=90 2.0.0=10"),
        "/api/update": ({"version": "2.0.0", "artifact": "file:///x"}, "--artifact and --sha256 go together"),
        "/api/update ": ({"version": "2.0.0", "activate": "canary", "canary": "150"},
                         "canary_percent: Input should be less than 100"),
        "/api/rollout": ({"version": "1.0.0", "stable": "1.0.0"}, "the candidate must be another version than stable"),
        "/api/rollout ": ({"version": "2.0.0", "stable": "1.0.0", "interval": "soon"}, "is not a duration"),
        "/api/rollout/abort": ({}, "no command for trivial in the control log"),
    }
    async with signed_in_beside(amqp_url, namespace, control_keys, "w-rules") as signed:
        console, session, csrf = signed.console, signed.session, signed.csrf
        for path, (form, words) in refused.items():
            async with session.post(console.url + path.strip(), headers=csrf,
                                    data={"model": "trivial", **form}) as response:
                error = (await response.json()).get("error", "")
                assert response.status in (400, 409) and words in error, (path, response.status, error)
        fleet = row(await get_state(session, console.url), "w-rules", "trivial")
    assert await operator.read_log() == []
    assert fleet is not None and (fleet["active"], fleet["weights"]) == ("1.0.0", {"1.0.0": 100.0})


async def test_bad_input_gets_a_clear_message_and_changes_nothing(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator,
    tmp_path: Path
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-bad")
    async with signed_in_beside(amqp_url, namespace, control_keys, "w-bad") as signed:
        console, session, csrf = signed.console, signed.session, signed.csrf
        async with session.post(console.url + "/api/try", headers=csrf,
                                data=_upload("trivial", b"%PDF-1.4 not a picture")) as not_image:
            assert not_image.status == 400
            assert "is not an image the pool takes (not_an_image" in (await not_image.json())["error"]
        async with session.post(console.url + "/api/try", headers=csrf,
                                data=_upload("nope", b"\x89PNG\r\n\x1a\n")) as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"].startswith("unknown model 'nope': no live worker serves it")
        async with session.post(console.url + "/api/update", headers=csrf,
                                data={"model": "nope", "version": "2.0.0"}) as unknown_update:
            assert unknown_update.status == 404 and "serving: trivial" in (await unknown_update.json())["error"]
        # What a page elsewhere makes the browser post: the form, no token (and SameSite=Strict
        # would even keep the cookie off it; here the cookie rides along, the worst case).
        async with session.post(console.url + "/api/update", data={"model": "trivial", "version": "2.0.0"}) as forged:
            assert forged.status == 403 and "CSRF token" in (await forged.json())["error"]
        fleet = row(await get_state(session, console.url), "w-bad", "trivial")
    assert await operator.read_log() == []
    assert fleet is not None and fleet["active"] == "1.0.0" and fleet["last_seq"] == 0


async def test_a_rollout_runs_from_the_console_and_its_abort_puts_traffic_back_on_stable(
    serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles, operator: Operator
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-roll")
    async with signed_in_beside(amqp_url, namespace, control_keys, "w-roll") as signed:
        console, session, csrf = signed.console, signed.session, signed.csrf
        form = {"model": "trivial", "version": "2.0.0", "stable": "1.0.0", "shadow": "0", "steps": "10,100",
                "interval": "10m"}
        async with session.post(console.url + "/api/rollout", headers=csrf, data=form) as started:
            assert started.status == 202, await started.text()
            assert (await started.json())["message"] == "rollout of trivial: 1.0.0 → 2.0.0 started"
        await wait_for_state(session, console.url, lambda s: cell(s, "w-roll", "trivial", "weights") == {
            "1.0.0": 90, "2.0.0": 10})
        async with session.post(console.url + "/api/rollout", headers=csrf, data=form) as again:
            assert again.status == 409 and "running from this console already" in (await again.json())["error"]
        async with session.post(console.url + "/api/rollout/abort", headers=csrf, data={"model": "trivial"}) as abort:
            assert abort.status == 200, await abort.text()
        state = await wait_for_state(session, console.url,
                                     lambda s: cell(s, "w-roll", "trivial", "weights") == {"1.0.0": 100})
        (run,) = state["rollouts"]
        said = "\n".join(run["lines"])
        assert not run["running"] and "aborting (operator)" in said and "traffic back on 1.0.0" in said, said
    kinds = [(c.action.kind, c.rollout.phase if c.rollout else None) for c in await operator.read_log()]
    assert kinds[:2] == [("update", "preload"), ("traffic", "canary")] and kinds[-1][1] == "aborted", kinds
