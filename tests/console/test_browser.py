"""The console in a real headless Chromium (Debian's, driven through its chromedriver: nothing is
downloaded), against a real worker on the real broker. Screenshots of each page go to out/console/.

Selenium blocks: every call into the browser runs in a thread, so that the worker and the console,
both in this test's event loop, keep serving while the browser waits on them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from console_support import TOKEN, running_console

from control import commands
from control.operator import Operator
from schemas.signing import KeyFiles

if TYPE_CHECKING:
    from conftest import ServeInProcess
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.slow
SHOTS = Path(__file__).resolve().parents[2] / "out" / "console"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def chromium() -> Iterator[WebDriver]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("no Chromium: apt-get install chromium chromium-driver (`make tools` does)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, should anything call it, downloads nothing
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-background-timer-throttling", "--disable-renderer-backgrounding"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class Page:
    """The browser, awaited: each call in a thread; `until` polls without holding the loop."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver, self.url = driver, url

    async def open(self, path: str) -> None:
        await asyncio.to_thread(self.driver.get, self.url + path)

    async def js(self, script: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, script, *args)

    async def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        element = await asyncio.to_thread(self.driver.find_element, By.CSS_SELECTOR, css)
        await asyncio.to_thread(element.clear) if element.get_attribute("type") != "file" else None
        await asyncio.to_thread(element.send_keys, text)

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        element = await asyncio.to_thread(self.driver.find_element, By.CSS_SELECTOR, css)
        await asyncio.to_thread(element.click)

    async def text(self, css: str) -> str:
        return str(await self.js("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css))

    async def until(self, css: str, words: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while words not in (seen := await self.text(css)):
            assert time.monotonic() < deadline, f"{css} never said {words!r}; it says {seen!r}"
            await asyncio.sleep(0.1)
        return seen

    async def shot(self, name: str) -> None:
        await asyncio.to_thread(self.driver.save_screenshot, str(SHOTS / f"{name}.png"))

    @property
    def path(self) -> str:
        return self.driver.current_url.removeprefix(self.url)


async def test_a_wrong_token_gets_nothing_then_the_fleet_try_it_and_an_update_from_the_page(
    chromium: WebDriver, serve_in_process: ServeInProcess, amqp_url: str, namespace: str, control_keys: KeyFiles,
    operator: Operator, bus_jpg: Path, tmp_path: Path
) -> None:
    await serve_in_process("trivial@1.0.0", name="w-browser")
    async with running_console(amqp_url, namespace, control_keys) as console:
        page = Page(chromium, console.url)
        await page.open("/updates")
        assert page.path == "/login"
        await page.type("#secret", "not the token")
        await page.click("#sign-in")
        await page.until("#login-error", "Wrong token or password.")
        await page.shot("login")
        await page.open("/")
        assert page.path == "/login"  # a wrong token got no session
        assert await operator.read_log() == []

        await page.type("#secret", TOKEN)
        await page.click("#sign-in")
        fleet = await page.until("#fleet tbody", "w-browser")
        assert "trivial" in fleet and "1.0.0 active" in fleet
        await page.until("#live", "live")
        await page.shot("fleet")

        await page.open("/try")
        await page.until("#try-model", "trivial")
        await page.type("#try-file", str(bus_jpg))
        caption = await page.until("#results figcaption", "trivial/1.0.0 on w-browser")
        assert "total" in caption and "ms" in caption
        assert await page.js("const i = document.querySelector('#results img'); return i.complete && i.naturalWidth")
        await page.shot("try")
        notes = tmp_path / "notes.txt"
        notes.write_text("not a picture")
        await page.type("#try-file", str(notes))
        await page.until("#message", "notes.txt is not an image the pool takes (not_an_image")

        await page.open("/updates")
        await page.until("#live", "live")
        await page.js("window.stayed = true;")  # gone if the page reloads
        await page.type("#form-update [name=model]", "trivial")
        await page.type("#form-update [name=version]", "2.0.0")
        await page.click("#form-update button")
        await page.until("#message", "published update for trivial as seq 1")
        timeline = await page.until("#timeline", "update to 2.0.0 done")
        assert "preload" in timeline and "validate" in timeline and "swap" in timeline
        await page.shot("updates")
        # Beside the page, the CLI: its rollback shows up in the same timeline, no reload.
        await asyncio.to_thread(commands.rollback, "trivial", None, wait=True, timeout=30, as_json=True,
                                amqp_url=amqp_url, namespace=namespace, key=control_keys.control_key,
                                worker_key=control_keys.worker_public)
        await page.until("#timeline", "rollback to the previous version done")
        assert await page.js("return window.stayed === true")

        # The fleet in one tab, live, while the page in another updates: it changes there without a reload.
        fleet_tab, updates_tab = chromium.current_window_handle, None
        await page.open("/")
        await page.until("#fleet tbody", "1.0.0 active")
        await page.js("window.stayed = true;")
        await asyncio.to_thread(chromium.switch_to.new_window, "tab")
        updates_tab = chromium.current_window_handle
        await page.open("/updates")
        await page.type("#form-update [name=model]", "trivial")
        await page.type("#form-update [name=version]", "2.0.0")
        await page.click("#form-update button")
        await page.until("#message", "published update for trivial as seq 3")
        await asyncio.to_thread(chromium.switch_to.window, fleet_tab)
        await page.until("#fleet tbody", "2.0.0 active")
        assert await page.js("return window.stayed === true")
        await asyncio.to_thread(chromium.switch_to.window, updates_tab)
        await asyncio.to_thread(chromium.close)
        await asyncio.to_thread(chromium.switch_to.window, fleet_tab)
    assert [c.action.kind for c in await operator.read_log()] == ["update", "rollback", "update"]
