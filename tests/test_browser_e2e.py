"""The demo shop (examples/shop.py) under a real uvicorn server, driven by a real headless
Chromium (Debian's /usr/bin/chromium through Playwright; no browser is downloaded)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from kvstorage.drivers import MemoryDriver
from sessions import CookieOptions, SessionManager
from sessions.store import handle_of

from .backends import require_service
from .support.sessions_support import live_keys, serve

pytestmark = pytest.mark.anyio

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def log_in(page: Any, url: str, user: str, *, remember: bool = False) -> None:
    await page.goto(url)
    await page.fill("#user", user)
    await page.fill("#password", "demo")
    if remember:
        await page.check("#remember")
    await page.click("#login")
    await page.wait_for_selector("#hello")


async def test_login_cart_devices_and_logout_in_a_real_browser():
    require_service(HAVE_CHROMIUM, "chromium")
    from playwright.async_api import async_playwright

    from examples.shop import create_app

    manager = SessionManager(MemoryDriver(), cookie=CookieOptions(secure=False))
    async with (
        serve(create_app(manager)) as url,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            # Device A: log in, fill a cart, reload.
            laptop = await browser.new_context(user_agent="laptop")
            page = await laptop.new_page()
            await page.goto(url)
            [anonymous] = await laptop.cookies()  # the login form's CSRF token
            await log_in(page, url, "ann")
            assert await page.text_content("#hello") == "Hello, ann!"
            assert await page.text_content("#flash") == "Welcome, ann."
            [cookie] = await laptop.cookies()
            assert cookie["name"] == "session" and cookie["httpOnly"]
            assert cookie["sameSite"] == "Lax" and cookie["expires"] == -1  # no remember me
            assert cookie["value"] != anonymous["value"]  # login regenerates the ID
            assert f"session:{handle_of(cookie['value'])}" in await live_keys(manager)
            for count, product in enumerate(["apple", "fig"], start=1):
                await page.click(f"#add-{product}")  # a POST, then a redirect: wait for it
                await page.wait_for_function(
                    f"document.querySelectorAll('#cart li').length == {count}"
                )
            await page.wait_for_load_state("load")
            await page.reload()
            assert await page.locator("#cart li").all_text_contents() == ["Apple", "Fig"]
            assert await page.locator("#flash").count() == 0  # the flash was shown once

            # Device B logs in with "remember me": a persistent cookie.
            phone = await browser.new_context(user_agent="phone")
            phone_page = await phone.new_page()
            await log_in(phone_page, url, "ann", remember=True)
            [remembered] = await phone.cookies()
            assert remembered["expires"] > time.time() + 29 * 86400

            # A browser restart keeps the persistent cookie only.
            for context, still_in in ((laptop, False), (phone, True)):
                state = await context.storage_state()
                kept = [c for c in state["cookies"] if c["expires"] != -1]
                restarted = await browser.new_context(storage_state={"cookies": kept})
                again = await restarted.new_page()
                await again.goto(url)
                assert (await again.locator("#hello").count() == 1) is still_in
                await restarted.close()

            # Device A lists both devices and signs B out; B is anonymous next time.
            await page.click("#devices")
            await page.wait_for_selector("#sessions")
            devices = await page.locator("td.device").all_text_contents()
            assert sorted(devices) == ["laptop", "phone"]
            row = page.locator("tr", has_text="phone")
            await row.locator("button.sign-out").click()
            await page.wait_for_function("document.querySelectorAll('td.device').length == 1")
            assert await page.locator("td.device").all_text_contents() == ["laptop"]
            await phone_page.reload()
            assert await phone_page.locator("#login").count() == 1
            assert await phone_page.locator("#hello").count() == 0

            # Log out: the cookie goes, and the session is gone from the storage.
            await page.click("#back")
            await page.wait_for_selector("#logout")
            await page.click("#logout")
            await page.wait_for_selector("#login")
            assert [c["value"] for c in await laptop.cookies()] != [cookie["value"]]
            assert f"session:{handle_of(cookie['value'])}" not in await live_keys(manager)
            assert await manager.sessions_of("ann") == []
            await page.reload()
            assert await page.locator("#hello").count() == 0
        finally:
            await browser.close()
