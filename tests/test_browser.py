"""The web chat as a person uses it: headless Chromium opens the page, types, clicks a button."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services.broker import EmbeddedServer
from tests.hubkit import Processor, webchat_config

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


async def chat_page(browser: Browser, hub: Hub, first: str) -> Page:
    """A person opens the chat and says `first`."""
    page = await browser.new_page()
    await page.goto(hub.http_url + "/")
    await expect(page.locator("#state")).to_have_text("connected")
    await page.fill("#text", first)
    await page.press("#text", "Enter")
    return page


async def test_links_from_the_app_are_followed_only_when_they_are_web_urls(hub: Hub, nats_client) -> None:
    """A `javascript:` link relayed by the app must not run in the page that keeps the session token."""
    app = await Processor(nats_client, hub.subjects.prefix, tenant="demo").start()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await chat_page(browser, hub, "links please")
            inbound, _ = await app.next()
            await app.reply(inbound, c.Buttons(text="links", buttons=[
                c.Button(id="a", title="docs", action="url", value="https://example.org/docs"),
                c.Button(id="b", title="prize", action="url", value="javascript:document.title='owned'"),
            ]), c.Media(media="document", url="javascript:document.title='owned'", filename="invoice.pdf"))
            await expect(page.locator(".hub a", has_text="docs")).to_have_attribute("href", "https://example.org/docs")
            await expect(page.locator(".hub span", has_text="prize")).to_have_count(1)
            await expect(page.locator(".hub span", has_text="invoice.pdf")).to_have_count(1)
            assert await page.locator(".hub a[href^='javascript']").count() == 0
        finally:
            await browser.close()


async def test_answers_sent_while_the_page_was_closed_are_shown_when_the_person_comes_back(hub: Hub, nats_client
                                                                                         ) -> None:
    """The page keeps its session and cursor: coming back, it is shown exactly what it missed."""
    app = await Processor(nats_client, hub.subjects.prefix, tenant="demo").start()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await chat_page(browser, hub, "call me back")
            await expect(page.locator(".hub").last).to_have_text("echo: call me back")
            inbound, _ = await app.next()
            await page.goto("about:blank")  # the person leaves

            answer = await app.reply(inbound, c.Text(text="we called, you were out"))
            while (await app.next_status()).message_id != answer.id:  # stored and sent while it was away
                pass
            await page.goto(hub.http_url + "/")
            await expect(page.locator(".hub")).to_have_text(["we called, you were out"])
            await expect(page.locator(".me")).to_have_count(0)  # nothing it had seen is shown again
        finally:
            await browser.close()


async def test_a_person_talks_into_the_microphone_and_hears_the_loopback_service(nats_server: EmbeddedServer) -> None:
    """The demo's audio path: Chromium's fake microphone → `client_media` → NATS → the `audio_loopback`
    service → NATS → the page's speaker; the call is an activity on the visitor's conversation."""
    async with Hub(webchat_config(nats_server.url, mic=True)) as hub, async_playwright() as playwright:
        inbound = await hub.nc.subscribe(f"{hub.subjects.prefix}.demo.in.>")
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=[
            *FLAGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            "--autoplay-policy=no-user-gesture-required"])
        try:
            page = await browser.new_page()
            await page.goto(hub.http_url + "/")
            await expect(page.locator("#state")).to_have_text("connected")
            await page.click("#mic")
            await expect(page.locator("#mic")).to_have_attribute("aria-pressed", "true")
            await page.wait_for_function("window.heardFrames > 25", timeout=20_000)  # half a second heard back
            await page.click("#mic")
            await expect(page.locator("#mic")).to_have_attribute("aria-pressed", "false")
        finally:
            await browser.close()
        kinds: set[str] = set()
        while not {"call_started", "call_ended"} <= kinds:
            envelope = c.decode((await inbound.next_msg(timeout=10)).data)
            if isinstance(envelope, c.Activity):
                kinds.add(envelope.activity)
