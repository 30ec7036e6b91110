"""The web chat as a person uses it: headless Chromium opens the page, types, clicks a button."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import async_playwright, expect

from babelhub.hub.app import Hub
from babelhub.hub.broker import EmbeddedServer
from tests.hubkit import webchat_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags NOTES.md verified on these machines: no sandbox as root, no outside connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.fixture
async def hub(nats_server: EmbeddedServer) -> AsyncIterator[Hub]:
    async with Hub(webchat_config(nats_server.url)) as running:
        yield running


async def test_a_person_chats_in_the_browser(hub: Hub) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(hub.http_url + "/")
            await expect(page.locator("#state")).to_have_text("connected")

            await page.fill("#text", "hello from a browser")
            await page.press("#text", "Enter")
            await expect(page.locator(".hub").last).to_have_text("echo: hello from a browser")

            await page.fill("#text", "menu")
            await page.click("form button")
            await expect(page.locator(".hub .choices button")).to_have_count(3)
            await page.click("text=Opening hours")
            await expect(page.locator(".hub").last).to_have_text("You chose: Opening hours")

            # A reload resumes the same session: the page presents the id and token the hub issued.
            stored = await page.evaluate("['session', 'token'].map((name) => localStorage['babelhub.webchat.' + name])")
            assert all(stored)
            await page.reload()
            await expect(page.locator("#state")).to_have_text("connected")
            await page.fill("#text", "back again")
            await page.press("#text", "Enter")
            await expect(page.locator(".hub").last).to_have_text("echo: back again")
            assert await page.evaluate("localStorage['babelhub.webchat.session']") == stored[0]
        finally:
            await browser.close()
