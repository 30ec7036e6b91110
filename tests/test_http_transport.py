"""The `http` processor transport: a real aiohttp app on 127.0.0.1 as the processor, a real hub and
nats-server, Telegram's fake API as the channel."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.processors import lanes
from babelhub.processors.http import retry_after, signature
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi
from tests.hubkit import (
    SECRET,
    TENANT,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
    with_hub,
)

SIGNING = "whsec-test-0123456789abcdef"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> ModuleType:
    """An example processor from examples/, imported from its file (the tests run the examples themselves)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


http_example = example("http_processor")

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


class App:
    """A processing app on 127.0.0.1: records each request (headers, body, the envelope) and answers with
    `handler` (default: the example app's sync reply)."""

    def __init__(self, handler: Handler | None = None, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[tuple[str, int]] = []  # (the inbound text, the status answered)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/babelhub"

    async def start(self) -> App:
        app = http_example.make_app(SIGNING)

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.read()
            self.requests.append(({k.lower(): v for k, v in request.headers.items()}, body))
            response: web.StreamResponse = (await self.handler(request, body) if self.handler is not None
                                            else await handler(request))
            self.answered.append((text_of(body), response.status))
            return response

        app.middlewares.append(record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def delivered(self) -> list[str]:
        """The texts of the inbound messages the app answered with a 2xx, in the order it answered."""
        return [text for text, status in self.answered if 200 <= status < 300]


def text_of(body: bytes) -> str:
    envelope = json.loads(body)
    return " ".join(part.get("text", "") for part in envelope.get("parts", []))


@pytest.fixture
async def app() -> AsyncIterator[App]:
    started = await App().start()
    yield started
    await started.stop()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff in tens of milliseconds, so retries happen within a test's patience."""
    monkeypatch.setattr(lanes, "RETRY_BASE", 0.02)
    monkeypatch.setattr(lanes, "RETRY_MAX", 0.3)


def http_config(nats_url: str, api_base: str, url: str, **options: Any) -> cfg.Config:
    config = telegram_config(nats_url, api_base)
    return msgspec.structs.replace(config, processors=[cfg.Processor(
        id="app", tenant=TENANT, transport="http", secrets={"signing_secret": SIGNING},
        options={"url": url, **options})])


async def start(start_hub: StartHub, nats_server: EmbeddedServer, fake_api: FakeApi, url: str,
                **options: Any) -> Hub:
    fake_api.responder = telegram_responder
    return await start_hub(http_config(nats_server.url, fake_api.base_url, url, **options))


async def post(hub: Hub, *updates: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session:
        for update in updates:
            async with session.post(f"{hub.http_url}/webhooks/telegram/tg", json=update,
                                    headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as answer:
                assert answer.status == 200


def sent_texts(api: FakeApi) -> list[str]:
    return [call.json()["text"] for call in api.requests if call.path.endswith("/sendMessage")]


async def letters(nc: NATS, hub: Hub) -> list[dict[str, Any]]:
    return dead_letters(await stream_messages(nc, f"{hub.subjects.prefix}.*.dlq.>",
                                              hub.subjects.stream_name("dead_letters")))


async def wait_letters(nc: NATS, hub: Hub, count: int = 1) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for _ in range(150):
        found = await letters(nc, hub)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} dead letter(s), found {found}")


updates = iter(range(1, 1_000_000))


def update(chat: int, text: str) -> dict[str, Any]:
    return telegram_update(next(updates), chat, text)


# ----------------------------------------------------------------------------------- signature

def test_the_readme_snippet_accepts_the_hubs_signature_and_nothing_forged_or_old() -> None:
    body, t = b'{"kind":"message"}', 1_767_225_600
    header = signature(SIGNING, t, body)
    verify = http_example.verify
    assert header.startswith(f"t={t},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SIGNING, header, body, now=t + 299)
    assert not verify(SIGNING, header, body + b" ", now=t)                        # the body changed
    assert not verify("another-secret-of-some-length", header, body, now=t)       # another secret
    assert not verify(SIGNING, header, body, now=t + 301)                         # too old: a replay
    assert not verify(SIGNING, header, body, now=t - 301)                         # from the future
    assert not verify(SIGNING, signature(SIGNING, t + 1, body).replace(f"t={t + 1}", f"t={t}"), body, now=t)
    assert not verify(SIGNING, "", body, now=t)
    assert not verify(SIGNING, "t=abc,v1=00", body, now=t)


def readme_snippet(language: str) -> str:
    """The signature check the README's "Processors over HTTP" gives in `language`."""
    section = README.read_text(encoding="utf-8").split("### Processors over HTTP", 1)[1].split("\n### ", 1)[0]
    match = re.search(rf"^```{language}\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert match is not None and "verify" in match.group(1)
    return match.group(1)


BODY = b'{"kind":"message"}'
SIGNED_CASES = [  # (the secret checked with, the body received, now, valid): signed with SIGNING at 1_767_225_600
    (SIGNING, BODY, 1_767_225_899, True),
    (SIGNING, BODY + b" ", 1_767_225_600, False),                   # the body changed
    ("another-secret-of-some-length", BODY, 1_767_225_600, False),  # another secret
    (SIGNING, BODY, 1_767_225_901, False),                          # too old: a replay
]


def test_the_readme_python_snippet_is_the_examples_check() -> None:
    namespace: dict[str, Any] = {}
    exec(readme_snippet("python"), namespace)  # the README's own code, run as a reader would paste it
    header = signature(SIGNING, 1_767_225_600, BODY)
    for secret, body, now, valid in SIGNED_CASES:
        assert namespace["verify"](secret, header, body, now=now) is valid
        assert http_example.verify(secret, header, body, now=now) is valid


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run the JavaScript snippet")
def test_the_readme_javascript_snippet_checks_the_same_way() -> None:
    header = signature(SIGNING, 1_767_225_600, BODY)
    cases = [{"secret": secret, "body": body.decode(), "now": now} for secret, body, now, _ in SIGNED_CASES]
    script = readme_snippet("javascript") + (
        "const [cases, header] = [JSON.parse(process.argv[1]), process.argv[2]];\n"
        "console.log(JSON.stringify(cases.map((x) => verify(x.secret, header, Buffer.from(x.body), x.now))));\n")
    ran = subprocess.run(["node", "-e", script, json.dumps(cases), header], capture_output=True, check=True,
                         timeout=30)
    assert json.loads(ran.stdout) == [valid for *_, valid in SIGNED_CASES]


def test_retry_after_reads_seconds_and_dates_and_ignores_garbage() -> None:
    assert retry_after("7") == 7.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
    assert retry_after("Fri, 01 Jan 2100 00:00:00 GMT") > 3000
    assert retry_after("") == retry_after("soon") == retry_after("-5") == 0.0


# ------------------------------------------------------------------------------------- delivery

async def test_each_inbound_is_posted_signed_and_its_sync_reply_sent_once(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub, app: App) -> None:
    hub = await start(start_hub, nats_server, fake_api, app.url)
    await post(hub, update(55, "hello"))
    await eventually(lambda: sent_texts(fake_api))
    # The example app checks the signature (a 401 otherwise), so a reply sent means it verified.
    assert sent_texts(fake_api) == ["You said: hello"]
    headers, body = app.requests[0]
    envelope = c.decode(body)
    assert headers["content-type"] == "application/json" and headers["user-agent"].startswith("babelhub/")
    assert headers["x-babelhub-delivery"] == lanes.delivery_id("app", envelope.id)
    assert http_example.verify(SIGNING, headers["x-babelhub-signature"], body)
    messages = await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.out.>",
                                     hub.subjects.stream_name("messages"))
    reply = c.decode(messages[0])
    assert isinstance(reply, c.Message) and reply.reply_to == envelope.id
    # Its idempotency key is the delivery's (the key makes the id): a retried delivery sends nothing twice.
    key = lanes.delivery_id("app", envelope.id) + ".0"
    assert reply.id == c.stable_id("idempotency", TENANT, key)
    assert (await hub.outbox.submit(TENANT, messages[0], idempotency_key=key)).duplicate
    assert len(app.requests) == 1 and len(messages) == 1 and await letters(nats_client, hub) == []


async def test_an_app_down_then_back_gets_everything_once_and_in_order_per_conversation(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub,
        quick_retries: None) -> None:
    async def unavailable(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=503)

    app = await App(unavailable).start()
    hub = await start(start_hub, nats_server, fake_api, app.url)
    texts = {55: ["a1", "a2", "a3"], 66: ["b1", "b2"]}
    await post(hub, *(update(chat, text) for chat, chat_texts in texts.items() for text in chat_texts))
    await eventually(lambda: len(app.requests) >= 6)           # retried while it answers 503
    await app.stop()                                            # then gone: connection refused
    await asyncio.sleep(0.5)
    back = await App(port=app.port).start()                     # back, answering with sync replies
    try:
        await eventually(lambda: len(sent_texts(fake_api)) == 5)
        delivered = back.delivered()
        assert sorted(delivered) == ["a1", "a2", "a3", "b1", "b2"]
        for chat_texts in texts.values():
            assert [text for text in delivered if text in chat_texts] == chat_texts
        assert sorted(sent_texts(fake_api)) == sorted(f"You said: {text}" for text in delivered)
        assert await letters(nats_client, hub) == []
    finally:
        await back.stop()


async def test_a_slow_conversation_does_not_hold_up_another(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> None:
    release, held = asyncio.Event(), asyncio.Event()

    async def slow_for_55(request: web.Request, body: bytes) -> web.StreamResponse:
        if c.decode(body).conversation.id == slow_conversation:
            held.set()
            await release.wait()
        return web.Response(status=204)

    app = await App(slow_for_55).start()
    hub = await start(start_hub, nats_server, fake_api, app.url)
    slow_conversation = c.conversation_id(TENANT, "tg", "55")
    try:
        await post(hub, update(55, "slow"))
        await asyncio.wait_for(held.wait(), 15)
        await post(hub, update(66, "quick one"), update(66, "quick two"))
        await eventually(lambda: app.delivered() == ["quick one", "quick two"])
        release.set()
        await eventually(lambda: app.delivered() == ["quick one", "quick two", "slow"])
    finally:
        release.set()
        await app.stop()


async def test_two_hubs_sharing_the_processor_deliver_each_conversation_in_order_once(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> None:
    async def slowish(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(0.03)  # long enough for another process to deliver the next one meanwhile
        return web.Response(status=204)

    app = await App(slowish).start()
    fake_api.responder = telegram_responder
    config = http_config(nats_server.url, fake_api.base_url, app.url)
    hubs = [await start_hub(config), await start_hub(config)]

    def split_evenly() -> bool:
        """Each hub works on half the partitions, and follows their consumers (a handover in the middle of
        the test would make a consumer afresh from its floor, and some envelopes would reach the app twice)."""
        followed = [set(hub._started().ownership.working) for hub in hubs]
        return len(followed[0]) == len(followed[1]) == config.hub.partitions // 2 and not followed[0] & followed[1]

    await eventually(split_evenly, timeout=60)
    chats = [55, 66, 77, 88]
    try:
        for round_ in range(5):
            await post(hubs[round_ % 2], *(update(chat, f"{chat}-{round_}") for chat in chats))
        await eventually(lambda: len(app.delivered()) == 20, timeout=60)
        delivered = app.delivered()
        for chat in chats:
            assert [text for text in delivered if text.startswith(f"{chat}-")] == [f"{chat}-{n}" for n in range(5)]
        assert len(app.requests) == 20
    finally:
        await app.stop()


async def test_a_hub_stopping_mid_delivery_leaves_it_to_the_next_owner(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> None:
    release, held = asyncio.Event(), asyncio.Event()

    async def hold_the_first_attempt(request: web.Request, body: bytes) -> web.StreamResponse:
        if not held.is_set():
            held.set()
            await release.wait()
        return web.Response(status=204)

    app = await App(hold_the_first_attempt).start()
    fake_api.responder = telegram_responder
    config = http_config(nats_server.url, fake_api.base_url, app.url)
    hubs = [await start_hub(config), await start_hub(config)]
    partition = hubs[0].subjects.partition(TENANT, c.conversation_id(TENANT, "tg", "55"))
    await eventually(lambda: any(hub.ctx.ownership is not None and partition in hub.ctx.ownership.held()
                                 for hub in hubs), timeout=60)
    try:
        await post(hubs[0], update(55, "in flight"))
        await asyncio.wait_for(held.wait(), 15)
        owner = next(hub for hub in hubs if hub.ctx.ownership is not None and partition in hub.ctx.ownership.held())
        await owner.stop()
        await eventually(lambda: app.delivered() == ["in flight"], timeout=60)
        first, again = (headers["x-babelhub-delivery"] for headers, _ in app.requests)
        assert first == again
    finally:
        release.set()
        await app.stop()


async def test_beyond_the_lanes_bounds_messages_wait_in_the_stream_and_keep_their_order(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, quick_retries: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "LANE_SIZE", 2)
    release, held = asyncio.Event(), asyncio.Event()

    async def hold_the_first(request: web.Request, body: bytes) -> web.StreamResponse:
        if text_of(body) == "a1":
            held.set()
            await release.wait()
        return web.Response(status=204)

    app = await App(hold_the_first).start()
    hub = await start(start_hub, nats_server, fake_api, app.url, max_conversations=1)
    try:
        await post(hub, update(55, "a1"))
        await asyncio.wait_for(held.wait(), 15)
        # One lane (max_conversations) of two messages: b1 and a4, a5 are handed back for later.
        await post(hub, update(55, "a2"), update(55, "a3"), update(66, "b1"), update(55, "a4"), update(55, "a5"))
        await eventually(lambda: len(app.requests) == 1 and lanes_of(hub).get("a", 0) == 2)
        release.set()
        # a6 finds room in the lane at once, but a3 to a5 are still out with the server: it waits for them.
        await post(hub, update(55, "a6"))
        await eventually(lambda: len(app.delivered()) == 7)
        delivered = app.delivered()
        assert [text for text in delivered if text.startswith("a")] == ["a1", "a2", "a3", "a4", "a5", "a6"]
        assert "b1" in delivered
    finally:
        release.set()
        await app.stop()


async def test_a_delivery_held_longer_than_the_ack_wait_is_kept_alive_not_redelivered(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    release, held = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        held.set()
        await release.wait()
        return web.Response(status=204)

    app = await App(slow).start()
    fake_api.responder = telegram_responder
    config = http_config(nats_server.url, fake_api.base_url, app.url)
    config = with_hub(config, ack_wait_seconds=1.0)
    hub = await start_hub(config)
    js, stream = nats_client.jetstream(), hub.subjects.stream_name("messages")
    try:
        await post(hub, update(55, "take your time"))
        await asyncio.wait_for(held.wait(), 15)
        await asyncio.sleep(3.0)  # three ack waits: the server would have sent it again by now
        infos = [info for info in await js.consumers_info(stream) if info.name.startswith("processor-app-")]
        assert sum(info.num_ack_pending for info in infos) == 1 and sum(info.num_redelivered for info in infos) == 0
        release.set()
        await eventually(lambda: app.delivered() == ["take your time"])
        await eventually(lambda: lanes_of(hub) == {})
        assert len(app.requests) == 1
    finally:
        release.set()
        await app.stop()


def http_transport(hub: Hub) -> Any:
    return next(plugin for plugin in hub._started().plugins if getattr(plugin, "name", "") == "http")


def lanes_of(hub: Hub) -> dict[str, int]:
    """How many messages the http transport's lanes hold, by the first letter of their texts."""
    transport = http_transport(hub)
    counts: dict[str, int] = {}
    for lane in transport.lanes._lanes.values():  # type: ignore[attr-defined]
        for job in lane:
            letter = text_of(job.delivery.body)[:1]
            counts[letter] = counts.get(letter, 0) + 1
    return counts


async def test_retry_after_is_honoured_and_a_timeout_is_retried(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, quick_retries: None) -> None:
    async def busy_then_slow_then_fine(request: web.Request, body: bytes) -> web.StreamResponse:
        if len(app.requests) == 1:
            return web.Response(status=503, headers={"Retry-After": "7"})
        if len(app.requests) == 2:
            await asyncio.sleep(2)  # past timeout_seconds: the hub gives up on this attempt, unanswered
            return web.Response(status=500)
        return web.Response(status=204)

    app = await App(busy_then_slow_then_fine).start()
    hub = await start(start_hub, nats_server, fake_api, app.url, timeout_seconds=0.5)
    transport = http_transport(hub)
    waits: list[float] = []

    async def note_the_wait(seconds: float) -> None:  # the hub's own wait, recorded instead of slept
        waits.append(seconds)

    transport.lanes._sleep = note_the_wait  # type: ignore[attr-defined]
    try:
        await post(hub, update(55, "patience"))
        await eventually(lambda: app.delivered() == ["patience"])
        assert len(app.requests) == 3 and waits[0] >= 7 and len(waits) == 2
    finally:
        await app.stop()


# ---------------------------------------------------------------------------------- dead letters

async def test_a_4xx_is_a_dead_letter_at_once_without_secret_or_signature(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    async def bad_request(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response({"echo": dict(request.headers)}, status=400)

    app = await App(bad_request).start()
    hub = await start(start_hub, nats_server, fake_api, app.url)
    try:
        await post(hub, update(55, "refused"))
        [letter] = await wait_letters(nats_client, hub)
        assert letter["stage"] == "processor" and "HTTP 400" in letter["error"]
        assert c.decode(letter["body"]).conversation.id == c.conversation_id(TENANT, "tg", "55")
        await post(hub, update(55, "next"))  # the conversation goes on, and the refused one was not retried
        await eventually(lambda: len(app.requests) == 2)
        assert [text_of(body) for _, body in app.requests] == ["refused", "next"]
        raw = msgspec.msgpack.encode(await letters(nats_client, hub))
        given = app.requests[0][0]["x-babelhub-signature"].split("v1=")[1]
        assert SIGNING.encode() not in raw and given.encode() not in raw
    finally:
        await app.stop()


async def test_past_the_deadline_a_delivery_is_a_dead_letter_with_the_last_error(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub,
        quick_retries: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def busy(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "0"})

    app = await App(busy).start()
    hub = await start(start_hub, nats_server, fake_api, app.url, deadline_seconds=1.0)
    try:
        await post(hub, update(55, "never answered"))
        [letter] = await wait_letters(nats_client, hub)
        assert letter["stage"] == "processor"
        assert "not delivered within 1 s" in letter["error"] and "HTTP 429" in letter["error"]
        assert len(app.requests) > 1  # retried until then
        assert text_of(letter["body"]) == "never answered"
        signatures = [headers["x-babelhub-signature"].split("v1=")[1] for headers, _ in app.requests]
        raw = msgspec.msgpack.encode(letter)
        assert SIGNING not in caplog.text and SIGNING.encode() not in raw
        assert not any(given in caplog.text or given.encode() in raw for given in signatures)
    finally:
        await app.stop()


TOO_BIG = b"[" + b" " * lanes.MAX_ANSWER_BYTES + b"]"


@pytest.mark.parametrize(("answer", "path", "words"), [
    (b"<html>oops</html>", "$", "expected a JSON list"),
    (b'{"messages": []}', "$", "expected a JSON list"),
    (TOO_BIG, "$", "larger than"),
    (json.dumps([{"conversation": {"connection": "tg", "native_id": "55"}, "parts": [{"type": "text"}]}]).encode(),
     "$[0].parts[0]", "reply refused"),
    (json.dumps([{"conversation": {"connection": "elsewhere", "native_id": "55"}, "parts": []}]).encode(),
     "$[0].conversation.connection", "not_found"),
])
async def test_an_unusable_answer_is_a_dead_letter_with_its_path_and_nothing_is_sent(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub,
        answer: bytes, path: str, words: str) -> None:
    async def garbage(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=200, body=answer, content_type="application/json")

    app = await App(garbage).start()
    hub = await start(start_hub, nats_server, fake_api, app.url)
    try:
        await post(hub, update(55, "hi"))
        [letter] = await wait_letters(nats_client, hub)
        assert (letter["stage"], letter["path"]) == ("processor", path) and words in letter["error"]
        assert len(app.requests) == 1 and sent_texts(fake_api) == []
    finally:
        await app.stop()


# ---------------------------------------------------------------------------------------- config

@pytest.mark.parametrize(("secrets", "options", "error"), [
    ({}, {"url": "http://127.0.0.1:1/"},
     r"\$\.processors\[0\]\.secrets: Object missing required field `signing_secret`"),
    ({"signing_secret": "short"}, {"url": "http://127.0.0.1:1/"}, r"\$\.processors\[0\]\.secrets\.signing_secret"),
    ({"signing_secret": SIGNING}, {"url": "ftp://x"}, r"\$\.processors\[0\]\.options\.url"),
    ({"signing_secret": SIGNING}, {"url": "http://x", "max_conversations": 0},
     r"\$\.processors\[0\]\.options\.max_conversations"),
])
async def test_bad_settings_stop_the_hub_at_start_with_their_path(
        nats_server: EmbeddedServer, fake_api: FakeApi, secrets: dict[str, str], options: dict[str, Any],
        error: str) -> None:
    config = telegram_config(nats_server.url, fake_api.base_url)
    config = msgspec.structs.replace(config, processors=[cfg.Processor(
        id="app", tenant=TENANT, transport="http", secrets=secrets, options=options)])
    with pytest.raises(ConfigError, match=error) as raised:
        async with Hub(config):
            pass
    assert SIGNING not in str(raised.value)

