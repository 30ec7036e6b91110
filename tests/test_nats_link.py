"""Nothing a client sends can break the hub's link to NATS (issue 7 §1), on a real nats-server.

nats-server closes a connection that publishes more than its `max_payload` (headers included), and
nats-py then gives that connection up for good. Each test here sends what used to do it, or takes
NATS away, and checks that the hub refuses or parks the input, stays connected, and keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.errors import ConfigError, PayloadTooLarge
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, Subjects, free_port, provision
from babelhub.services.deadletters import DeadLetter, DeadLetters
from babelhub.services.publisher import MAX_TRACESTATE, Publisher
from babelhub.services.telemetry import Metrics
from tests.fakeapi import FakeApi
from tests.hubkit import (
    SECRET,
    TENANT,
    HubProcess,
    Processor,
    WebVisitor,
    dead_letters,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
    unique_prefix,
    webchat_config,
    with_hub,
    write_config,
)

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
FIXTURES = Path(__file__).parent / "fixtures"
APP_SECRET = "meta-app-secret"


@pytest.fixture
async def telegram_api(fake_api: FakeApi) -> FakeApi:
    fake_api.responder = telegram_responder
    return fake_api


@pytest.fixture
async def telegram_hub(nats_server: EmbeddedServer, telegram_api: FakeApi) -> AsyncIterator[Hub]:
    async with Hub(telegram_config(nats_server.url, telegram_api.base_url)) as hub:
        yield hub


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.startswith("{") else {}), dict(response.headers)


async def post_update(hub: Hub, update: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, body, _ = await post(hub.http_url + "/webhooks/telegram/tg", json.dumps(update).encode(),
                                 {"Content-Type": "application/json", **HEADERS, **(headers or {})})
    return status, body


async def letters_of(nc: NATS, hub: Hub, count: int) -> list[dict[str, Any]]:
    """The hub's dead letters, once there are `count` of them."""
    letters: list[dict[str, Any]] = []

    async def read() -> bool:
        letters[:] = dead_letters(await stream_messages(nc, f"{hub.subjects.prefix}.*.dlq.>",
                                                        hub.subjects.stream_name("dead_letters")))
        return len(letters) >= count

    for _ in range(200):
        if await read():
            return letters
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} dead letters, found {letters}")


async def test_a_signed_webhook_just_under_the_old_one_mebibyte_limit_is_413_and_the_hub_carries_on(
        telegram_hub: Hub, nats_client: NATS) -> None:
    app = await Processor(nats_client, telegram_hub.subjects.prefix).start()
    update = telegram_update(1, 42, "")
    update["message"]["text"] = "x" * (1024 * 1024 - 256 - len(json.dumps(update)))  # with headers: > 1 MiB

    status, body = await post_update(telegram_hub, update)

    assert status == 413
    assert body["limit"] == telegram_hub.config.hub.max_body_bytes < 1024 * 1024
    assert "hub.max_body_bytes" in body["error"]
    assert (await post_update(telegram_hub, telegram_update(2, 42, "next one")))[0] == 200
    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.parts == [c.Text(text="next one")]
    assert telegram_hub.nc.is_connected


async def test_a_request_whose_headers_make_the_record_too_large_is_413_and_kept_shortened(
        telegram_hub: Hub, nats_client: NATS) -> None:
    app = await Processor(nats_client, telegram_hub.subjects.prefix).start()
    # Within every single limit: a 200 KB signed body and 960 KB of headers (aiohttp takes 128 of 8 KB).
    padding = {f"X-Pad-{n}": "p" * 8000 for n in range(120)}
    update = telegram_update(1, 42, "w" * 200_000)

    status, body = await post_update(telegram_hub, update, headers=padding)

    assert status == 413 and body["limit"] == telegram_hub.publisher.max_payload
    assert (await post_update(telegram_hub, telegram_update(2, 42, "next one")))[0] == 200
    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.parts == [c.Text(text="next one")]
    (letter,) = await letters_of(nats_client, telegram_hub, 1)
    assert letter["stage"] == "ingest" and "max_payload" in letter["error"]
    sent = json.dumps(update).encode()
    assert letter["body"] == sent and letter["body_size"] == len(sent)
    assert letter["body_sha256"] == hashlib.sha256(sent).hexdigest()
    assert "headers" in letter["truncated"] and 0 < len(letter["headers"]) < len(padding)


async def test_an_outbound_message_too_large_to_fan_out_is_dead_lettered_and_the_link_survives(
        telegram_hub: Hub, nats_client: NATS) -> None:
    app = await Processor(nats_client, telegram_hub.subjects.prefix).start()
    assert (await post_update(telegram_hub, telegram_update(1, 42, "hi")))[0] == 200
    inbound, _ = await app.next()
    # Sized so that the processor's own publish (no headers) fits, while the hub's copy for the other chat,
    # which carries the chat's details and a Nats-Msg-Id header, would not.
    reply = c.Message(id=c.new_id(), tenant=TENANT, conversation=c.Conversation(id=inbound.conversation.id),
                      ts=c.now(), direction="outbound", parts=[c.Text(text="")],
                      targets=[c.Target(connection="tg", to="77")])
    room = telegram_hub.publisher.max_payload - len(c.encode(reply)) - 16
    reply = msgspec.structs.replace(reply, parts=[c.Text(text="y" * room)])
    payload = c.encode(reply)
    await nats_client.publish(f"{telegram_hub.subjects.prefix}.{TENANT}.out.{inbound.conversation.id}", payload)

    (letter,) = await letters_of(nats_client, telegram_hub, 1)
    assert letter["stage"] == "send" and "max_payload" in letter["error"]
    assert letter["body_size"] == len(payload) and letter["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert "body" in letter["truncated"] and payload.startswith(letter["body"]) and len(letter["body"]) > 0
    assert telegram_hub.nc.is_connected
    assert (await post_update(telegram_hub, telegram_update(2, 42, "still here")))[0] == 200
    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.parts == [c.Text(text="still here")]


@pytest.fixture
async def publisher(nats_client: NATS) -> tuple[Publisher, Subjects]:
    subjects = Subjects(unique_prefix())
    js = nats_client.jetstream()
    await provision(js, subjects, 60.0)
    return Publisher(nats_client, js), subjects


async def test_a_dead_letter_for_a_body_larger_than_max_payload_keeps_its_start_size_and_hash(
        publisher: tuple[Publisher, Subjects], nats_client: NATS) -> None:
    sender, subjects = publisher
    body = os.urandom(2 * sender.max_payload)
    letters = DeadLetters(sender, subjects, Metrics())

    await letters.park(DeadLetter(stage="decode", error="too big to read", tenant=TENANT, body=body,
                                  headers={"x-long": "h" * sender.max_payload}))

    stored = await stream_messages(nats_client, f"{subjects.prefix}.{TENANT}.dlq.>",
                                   subjects.stream_name("dead_letters"))
    (letter,) = dead_letters(stored)
    assert letter["body_size"] == len(body) and letter["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert 0 < len(letter["body"]) < sender.max_payload and body.startswith(letter["body"])
    assert letter["truncated"] == ["headers", "body"] and letter["error"] == "too big to read"
    assert nats_client.is_connected


async def test_publishes_and_snapshots_beyond_max_payload_are_refused_before_they_reach_the_server(
        publisher: tuple[Publisher, Subjects], nats_client: NATS) -> None:
    sender, subjects = publisher
    subject = f"{subjects.prefix}.{TENANT}.in.x"
    fits_alone = b"z" * (sender.max_payload - 8)  # the payload fits; with its headers it does not
    with pytest.raises(PayloadTooLarge, match="max_payload"):
        await sender.publish(subject, fits_alone, dedup=("some", "id"))
    snapshots = await nats_client.jetstream().key_value(subjects.bucket("conversations"))
    with pytest.raises(PayloadTooLarge):
        await sender.store(snapshots, "conv", b"s" * sender.max_payload, last=None)

    assert nats_client.is_connected
    await sender.publish(subject, b"small", dedup=("some", "id"))
    assert await sender.store(snapshots, "conv", b"small", last=None) > 0


async def test_the_publisher_measures_headers_as_the_server_does(
        publisher: tuple[Publisher, Subjects], nats_client: NATS) -> None:
    sender, subjects = publisher
    subject = f"{subjects.prefix}.{TENANT}.in.exact"
    headers = {**sender.headers(("exact",)), "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    largest = b"e" * sender.room(headers)

    ack = await sender.publish(subject, largest, headers=headers)  # the server takes it: the count was exact
    with pytest.raises(PayloadTooLarge):
        await sender.publish(subject, largest + b"e", headers=headers)
    assert ack.seq > 0 and nats_client.is_connected


def whatsapp_config(nats_url: str) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[cfg.Connection(id="wa", tenant=TENANT, channel="whatsapp",
                                    secrets={"app_secret": APP_SECRET, "access_token": "EAAG-test"},
                                    options={"phone_number_id": "106540352242922"})],
    )


def whatsapp_batch(ids: list[str]) -> bytes:
    """The documented text-message webhook, carrying one message per id."""
    webhook = json.loads((FIXTURES / "whatsapp" / "text.json").read_bytes())
    value = webhook["entry"][0]["changes"][0]["value"]
    template = value["messages"][0]
    value["messages"] = [{**copy.deepcopy(template), "id": message_id} for message_id in ids]
    return json.dumps(webhook).encode()


async def test_nats_msg_id_and_trace_headers_have_a_bounded_length_whatever_the_client_sends(
        nats_server: EmbeddedServer, nats_client: NATS) -> None:
    long_state = ",".join(f"k{n}=" + "v" * 200 for n in range(30))  # valid W3C tracestate, 6 KB
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": long_state}
    async with Hub(whatsapp_config(nats_server.url)) as hub:
        for ids in (["wamid.short"], [f"wamid.{n}." + "L" * 5000 for n in range(20)]):
            body = whatsapp_batch(ids)
            signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
            status, _, _ = await post(hub.http_url + "/webhooks/whatsapp/wa", body, {
                "Content-Type": "application/json", "X-Hub-Signature-256": signature, **trace})
            assert status == 200
        js = nats_client.jetstream()
        subscription = await js.subscribe(f"{hub.subjects.prefix}.*.raw.>", stream=hub.subjects.stream_name("raw"),
                                          ordered_consumer=True)
        records = [await subscription.next_msg(timeout=5) for _ in range(2)]
        await subscription.unsubscribe()
    short, long = (dict(record.headers or {}) for record in records)
    assert len(long["Nats-Msg-Id"]) == len(short["Nats-Msg-Id"]) <= 32
    assert long["Nats-Msg-Id"] != short["Nats-Msg-Id"]
    assert long["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert len(long.get("tracestate", "")) <= MAX_TRACESTATE


async def test_a_body_limit_without_room_under_max_payload_is_refused_at_start(
        nats_server: EmbeddedServer, telegram_api: FakeApi) -> None:
    config = telegram_config(nats_server.url, telegram_api.base_url)
    config = with_hub(config, max_body_bytes=1024 * 1024)
    with pytest.raises(ConfigError, match=r"hub.max_body_bytes = 1048576 .* max_payload of 1048576"):
        async with Hub(config):
            pass


async def readyz(session: aiohttp.ClientSession, hub: Hub) -> tuple[int, dict[str, Any]]:
    async with session.get(hub.http_url + "/readyz") as response:
        return response.status, await response.json()


async def test_the_hub_rides_out_a_nats_restart(tmp_path: Path, telegram_api: FakeApi) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        async with Hub(telegram_config(server.url, telegram_api.base_url)) as hub, aiohttp.ClientSession() as session:
            assert (await post_update(hub, telegram_update(1, 42, "before")))[0] == 200
            await server.stop()
            states: list[tuple[int, dict[str, Any]]] = []

            async def down() -> bool:
                states.append(await readyz(session, hub))
                return states[-1][0] == 503

            await eventually_async(down)
            assert states[-1][1]["ready"] is False and states[-1][1]["nats"] is False
            status, body, headers = await post(hub.http_url + "/webhooks/telegram/tg",
                                               json.dumps(telegram_update(2, 42, "during")).encode(),
                                               {"Content-Type": "application/json", **HEADERS})
            assert status == 503 and int(headers["Retry-After"]) > 0 and "retry" in body["error"]

            await server.start()
            await eventually_async(lambda: _ready(session, hub))
            async with connected(server.url) as nc:
                app = await Processor(nc, hub.subjects.prefix).start()
                assert (await post_update(hub, telegram_update(3, 42, "after")))[0] == 200
                texts: list[str] = []
                while "after" not in texts:
                    envelope, _ = await app.next()
                    assert isinstance(envelope, c.Message)
                    texts.extend(part.text for part in envelope.parts if isinstance(part, c.Text))
    finally:
        await server.stop()


async def _ready(session: aiohttp.ClientSession, hub: Hub) -> bool:
    status, body = await readyz(session, hub)
    return status == 200 and body["ready"] is True and body["nats"] is True


async def eventually_async(check: Any, timeout: float = 30.0) -> None:
    """Like `eventually`, for an async check."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[NATS]:
    """A NATS client of the test's own, drained on the way out."""
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.drain()


async def test_babelhub_run_exits_non_zero_when_nats_is_gone_for_good(
        tmp_path: Path, telegram_api: FakeApi) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    port = free_port()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{server.url}"
subject_prefix = "{unique_prefix()}"
nats_max_reconnect_attempts = 2
[[tenants]]
id = "{TENANT}"
""")
    hub = HubProcess(config, tmp_path)
    hub.start()
    try:
        await hub.wait_ready(f"http://127.0.0.1:{port}")
        await server.stop()
        assert hub.process is not None
        loop = asyncio.get_running_loop()
        code = await asyncio.wait_for(loop.run_in_executor(None, hub.process.wait), 60)
        output = hub.output()
        assert code != 0 and "lost for good" in output, output
    finally:
        hub.stop()
        await server.stop()



async def test_babelhub_run_exits_non_zero_when_its_embedded_nats_server_dies(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats_port = 0
data_dir = "{tmp_path / 'data'}"
[[tenants]]
id = "{TENANT}"
""")
    hub = HubProcess(config, tmp_path)
    hub.start()
    try:
        await hub.wait_ready(f"http://127.0.0.1:{port}")
        (server,) = hub.children()
        os.kill(server, signal.SIGKILL)

        assert hub.process is not None
        code = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, hub.process.wait), 60)
        output = hub.output()
        assert code != 0 and "embedded nats-server exited" in output, output
    finally:
        hub.stop()


async def test_a_web_chat_frame_while_nats_is_down_closes_with_1013_and_the_hub_stays_up(tmp_path: Path) -> None:
    """Nothing was recorded, so the socket is closed with "try again later" (the page reconnects),
    never left open as if the frame had been taken; once NATS is back the same visitor is answered."""
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        async with Hub(webchat_config(server.url)) as hub, aiohttp.ClientSession() as session:
            visitor = await WebVisitor.open(session, hub.http_url)
            await server.stop()
            await eventually_async(lambda: _nats_down(session, hub))
            await visitor.say("while NATS is down", "m1")
            closing = await visitor.socket.receive(timeout=10)
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert closing.data == aiohttp.WSCloseCode.TRY_AGAIN_LATER and "reconnect later" in closing.extra
            await server.start()
            await eventually_async(lambda: _ready(session, hub))
            back = await WebVisitor.open(session, hub.http_url, resume=visitor)
            assert back.hello["resumed"] is True
            await back.say("back", "m2")  # the page sends again what was not taken
            assert (await back.reply())["parts"] == [{"type": "text", "text": "echo: back"}]
    finally:
        await server.stop()


async def _nats_down(session: aiohttp.ClientSession, hub: Hub) -> bool:
    status, body = await readyz(session, hub)
    return status == 503 and body["nats"] is False


async def test_a_start_that_fails_half_way_leaves_no_server_and_no_task(tmp_path: Path, telegram_api: FakeApi) -> None:
    """The embedded server is started and watched before the body limit is checked against it: a start
    refused there stops the server and the task that watched it (every start step undoes itself)."""
    config = telegram_config("", telegram_api.base_url)
    config = msgspec.structs.replace(config, hub=msgspec.structs.replace(
        config.hub, nats_port=0, data_dir=str(tmp_path / "data"), max_body_bytes=1024 * 1024))
    hub = Hub(config)
    with pytest.raises(ConfigError, match="max_body_bytes"):
        await hub.__aenter__()
    assert hub.server is not None and hub.server.process is None  # the embedded nats-server was stopped
    await asyncio.sleep(0)
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "embedded-nats-watch"]
    assert not hub.nats_lost.is_set()  # its end was the hub's own doing, not a lost connection
