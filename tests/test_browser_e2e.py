"""The demo shop (examples/shop.py) under a real uvicorn server, driven by a real headless
Chromium (Debian's /usr/bin/chromium through Playwright; no browser is downloaded)."""

from __future__ import annotations

import os

import pytest

from kvstorage.drivers import MemoryDriver
from sessions import CookieOptions, SessionManager
from sessions.store import handle_of

from .backends import require_service
from .support.sessions_support import serve

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


async def test_login_cart_reload_logout_in_a_real_browser():
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
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(url)
            assert await context.cookies() == []  # the login page creates no session
            assert await manager.storage.get_keys() == []

            await page.fill("#user", "ann")
            await page.fill("#password", "demo")
            await page.click("#login")
            assert await page.text_content("#hello") == "Hello, ann!"
            assert await page.text_content("#flash") == "Welcome, ann."
            [cookie] = await context.cookies()
            assert cookie["name"] == "session" and cookie["httpOnly"]
            assert cookie["sameSite"] == "Lax"
            assert await manager.storage.get_keys() == [f"session:{handle_of(cookie['value'])}"]

            for count, product in enumerate(["apple", "fig"], start=1):
                await page.click(f"#add-{product}")  # a POST, then a redirect: wait for it
                await page.wait_for_function(
                    f"document.querySelectorAll('#cart li').length == {count}"
                )
            await page.wait_for_load_state("load")
            await page.reload()
            assert await page.locator("#cart li").all_text_contents() == ["Apple", "Fig"]
            assert await page.locator("#flash").count() == 0  # the flash was shown once

            await page.click("#logout")
            await page.wait_for_selector("#login")
            assert await context.cookies() == []
            assert await manager.storage.get_keys() == []
            await page.reload()
            assert await page.locator("#hello").count() == 0
        finally:
            await browser.close()
