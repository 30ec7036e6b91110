"""Loop prevention on the paths the Outbox does not see (issue 11 §5), on a real nats-server, hub and a
local fake Bot API: a processor's message published straight on NATS carries its hop count
(`Babelhub-Hops`), and past `routing.MAX_HOPS` the conversation actor refuses it, keeps it as a dead
letter and reports it `failed` (`loop_detected`) instead of sending it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.routing import HOPS_HEADER, MAX_HOPS
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import (
    TENANT,
    Processor,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    unique_prefix,
)
from tests.test_hub_statuses import fixture, meta_signed

CHAT = "4242"


def message(text: str) -> c.Message:
    conversation = c.Conversation(id=c.conversation_id(TENANT, "tg", CHAT), channel="telegram", connection="tg",
                                  native_id=CHAT)
    return c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                     parts=[c.Text(text=text)])


def texts(api: FakeApi) -> list[str]:
    return [call.json()["text"] for call in api.requests if call.path.endswith("/sendMessage")]


@pytest.fixture
def config(nats_server: EmbeddedServer, fake_api: FakeApi) -> cfg.Config:
    fake_api.responder = telegram_responder
    return telegram_config(nats_server.url, fake_api.base_url)


async def next_status_of(app: Processor, message_id: str) -> c.Status:
    while True:
        status = await app.next_status()
        if status.message_id == message_id:
            return status


async def test_a_message_published_on_nats_past_max_hops_is_refused_and_kept(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    looping = message("round and round")
    await app.send(looping, headers={HOPS_HEADER: str(MAX_HOPS + 1)})
    refused = await next_status_of(app, looping.id)
    assert refused.state == "failed" and refused.error is not None
    assert refused.error.code == "loop_detected" and f"{MAX_HOPS + 1} processor round trips" in refused.error.message

    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.>",
                                                 hub.subjects.stream_name("dead_letters")))
    assert [letter["stage"] for letter in letters] == ["processor"]
    assert "loop_detected" in letters[0]["error"]
    assert c.decode(letters[0]["body"]).id == looping.id

    last_allowed = message("one more relay is fine")
    await app.send(last_allowed, headers={HOPS_HEADER: str(MAX_HOPS)})
    assert (await next_status_of(app, last_allowed.id)).state == "sent"
    assert texts(fake_api) == ["one more relay is fine"]


# ------------------------------------------------------------------- two connections in one chat

WA_NUMBERS = {"wa1": "15550001111", "wa2": "15550002222"}
"""Each WhatsApp connection's business number, as the other one sees it (`wa_id`)."""
PHONE_NUMBER_IDS = {"wa1": "106540352242922", "wa2": "106540352242923"}


def two_numbers_config(nats_url: str, api_base: str) -> cfg.Config:
    """Two WhatsApp numbers of one tenant, answered by the echo processor."""
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[cfg.Connection(id=name, tenant=TENANT, channel="whatsapp", api_base=f"{api_base}/{name}",
                                    secrets={"access_token": "wa-token", "app_secret": "wa-app"},
                                    options={"phone_number_id": PHONE_NUMBER_IDS[name]},
                                    identities=[WA_NUMBERS[name]]) for name in WA_NUMBERS],
        processors=[cfg.Processor(id="echo", tenant=TENANT, transport="echo")],
    )


def whatsapp_text(to_connection: str, sender: str, text: str, serial: int) -> bytes:
    """What WhatsApp posts to `to_connection` when `sender` writes `text` to its number (fixture text.json)."""
    body = fixture("whatsapp", "text.json")
    value = body["entry"][0]["changes"][0]["value"]
    value["metadata"] = {"display_phone_number": WA_NUMBERS[to_connection],
                         "phone_number_id": PHONE_NUMBER_IDS[to_connection]}
    value["contacts"][0]["wa_id"] = sender
    value["messages"][0].update({"from": sender, "id": f"wamid.relay{serial:08d}", "timestamp": str(int(time.time())),
                                 "text": {"body": text}})
    return json.dumps(body).encode()


class WhatsAppBetweenNumbers:
    """The channel between the two numbers: what one connection sends to the other's number arrives
    at the other as a message from the first (a bounded number of times)."""

    def __init__(self, api: FakeApi, hub_url: str, limit: int = 12) -> None:
        self.api = api
        self.hub_url = hub_url
        self.limit = limit
        self.relayed = 0
        api.responder = self.answer

    def answer(self, request: Recorded) -> Reply:
        body = fixture("whatsapp", "response_sent.json")
        body["messages"][0]["id"] = f"wamid.sent{len(self.api.requests):08d}"
        return Reply(body=body)

    def sends(self) -> list[tuple[str, str, str]]:
        """(connection, to, text) of every message sent."""
        found = []
        for call in self.api.requests:
            if call.path.endswith("/messages") and call.json().get("type") == "text":
                found.append((call.path.split("/")[1], call.json()["to"], call.json()["text"]["body"]))
        return found

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while self.relayed < self.limit:
                sends = self.sends()
                for sender_connection, to, text in sends[self.relayed:]:
                    receiver = next(name for name, number in WA_NUMBERS.items() if number == to)
                    data = whatsapp_text(receiver, WA_NUMBERS[sender_connection], text, self.relayed)
                    url = f"{self.hub_url}/webhooks/whatsapp/{receiver}"
                    async with session.post(url, data=data, headers=meta_signed("wa-app")(url, data)) as response:
                        assert response.status == 200, await response.text()
                    self.relayed += 1
                await asyncio.sleep(0.05)


async def test_two_connections_in_one_chat_do_not_answer_each_other_forever(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(two_numbers_config(nats_server.url, fake_api.base_url))
    channel = WhatsAppBetweenNumbers(fake_api, hub.http_url)
    relay = asyncio.create_task(channel.run())
    try:
        to_wa2 = c.Conversation(id=c.conversation_id(TENANT, "wa1", WA_NUMBERS["wa2"]), channel="whatsapp",
                                connection="wa1", native_id=WA_NUMBERS["wa2"])
        app = await Processor(nats_client, hub.subjects.prefix).start()
        await app.send(c.Message(id=c.new_id(), tenant=TENANT, conversation=to_wa2, ts=c.now(),
                                 direction="outbound", parts=[c.Text(text="ping")]))

        async def loop_letters() -> list[dict[str, Any]]:
            letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.>",
                                                         hub.subjects.stream_name("dead_letters")))
            return [letter for letter in letters if letter["stage"] == "loop"]

        found: list[dict[str, Any]] = []

        async def stopped() -> bool:
            found[:] = await loop_letters()
            return bool(found)

        await eventually_async(stopped)
        assert "connection 'wa1'" in found[0]["error"] and WA_NUMBERS["wa1"] in found[0]["error"]
        stopped_message = c.decode(found[0]["body"])
        assert stopped_message.conversation.connection == "wa2"
        # The relayed "second" is stopped too; by then anything the hub did with the first one is done.
        await app.send(c.Message(id=c.new_id(), tenant=TENANT, conversation=to_wa2, ts=c.now(),
                                 direction="outbound", parts=[c.Text(text="second")]))
        await eventually_async(lambda: _true(channel.relayed == 2))

        async def both_stopped() -> bool:
            return len(await loop_letters()) == 2

        await eventually_async(both_stopped)
        assert channel.sends() == [("wa1", WA_NUMBERS["wa2"], "ping"), ("wa1", WA_NUMBERS["wa2"], "second")]
    finally:
        relay.cancel()


async def _true(value: bool) -> bool:
    return value


async def eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.1)


async def test_the_channel_s_echo_of_a_message_the_hub_sent_is_not_handed_to_processors(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """WhatsApp's `smb_message_echoes` repeat what the business number sent: one naming the wamid the hub
    got for its own send is the hub hearing itself (an echo of a message sent from the Business app is not)."""
    config = two_numbers_config(nats_server.url, fake_api.base_url)
    hub = await start_hub(msgspec.structs.replace(config, processors=[]))
    channel = WhatsAppBetweenNumbers(fake_api, hub.http_url, limit=0)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    chat = "16505551234"
    conversation = c.Conversation(id=c.conversation_id(TENANT, "wa1", chat), channel="whatsapp", connection="wa1",
                                  native_id=chat)
    sent = c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                     parts=[c.Text(text="Your order has shipped")])
    await app.send(sent)
    status = await next_status_of(app, sent.id)
    assert status.state == "sent" and len(channel.sends()) == 1

    url = f"{hub.http_url}/webhooks/whatsapp/wa1"
    async with aiohttp.ClientSession() as session:
        for native_id, text in ((status.native_id, "Your order has shipped"), ("wamid.fromTheApp", "typed by hand")):
            body = fixture("whatsapp", "echo_text.json")
            value = body["entry"][0]["changes"][0]["value"]
            value["metadata"]["phone_number_id"] = PHONE_NUMBER_IDS["wa1"]
            value["message_echoes"][0].update({"from": WA_NUMBERS["wa1"], "to": chat, "id": native_id,
                                               "timestamp": str(int(time.time())), "text": {"body": text}})
            data = json.dumps(body).encode()
            async with session.post(url, data=data, headers=meta_signed("wa-app")(url, data)) as response:
                assert response.status == 200, await response.text()

    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.native is not None
    assert inbound.native.id == "wamid.fromTheApp"  # the hub's own message, sent first, was not handed on
    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.>",
                                                 hub.subjects.stream_name("dead_letters")))
    assert [letter["stage"] for letter in letters] == ["loop"]
    assert sent.id in letters[0]["error"]


async def test_a_copy_fanned_out_to_another_chat_carries_the_hop_count(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """Targets in other chats are re-published on their conversations' `out` subjects: a loop through
    targets is counted like one through the chat itself."""
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    relayed = msgspec.structs.replace(message("to both"), targets=[c.Target(connection="tg", to="5555")])
    await app.send(relayed, headers={HOPS_HEADER: "5"})
    await eventually(lambda: len(texts(fake_api)) == 1)
    there = c.conversation_id(TENANT, "tg", "5555")
    js = nats_client.jetstream()
    subscription = await js.subscribe(f"{hub.subjects.prefix}.{TENANT}.out.>",
                                      stream=hub.subjects.stream_name("messages"), ordered_consumer=True)
    found: dict[str, str] = {}
    try:
        while True:
            try:
                stored = await subscription.next_msg(timeout=1.0)
            except TimeoutError:
                break
            if c.decode(stored.data).conversation.id == there:
                found = dict(stored.headers or {})
    finally:
        await subscription.unsubscribe()
    assert found.get(HOPS_HEADER) == "5"
