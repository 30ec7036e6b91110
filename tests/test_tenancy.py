"""Tenants are isolated on every path: attacks by one tenant's processor on another tenant's chats, the
secrets a hub holds, its metrics labels, and the embedded nats-server's credentials."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from babelhub import canonical as c
from babelhub.hub import config as cfg
from babelhub.hub.app import Hub
from babelhub.hub.broker import EmbeddedServer
from tests.fakeapi import FakeApi
from tests.hubkit import (
    Processor,
    dead_letters,
    eventually,
    stream_messages,
    telegram_responder,
    telegram_update,
    unique_prefix,
)

TOKEN_A, SECRET_A = "111111:AAAA-bot-token-of-tenant-a", "secret-token-of-tenant-a"
TOKEN_B, SECRET_B = "222222:BBBB-bot-token-of-tenant-b", "secret-token-of-tenant-b"


def two_tenants(nats_url: str, api_a: str, api_b: str) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="alpha"), cfg.Tenant(id="beta")],
        connections=[
            cfg.Connection(id="tg-a", tenant="alpha", channel="telegram", api_base=api_a,
                           secrets={"bot_token": TOKEN_A, "secret_token": SECRET_A}),
            cfg.Connection(id="tg-b", tenant="beta", channel="telegram", api_base=api_b,
                           secrets={"bot_token": TOKEN_B, "secret_token": SECRET_B}),
        ],
    )


async def post_update(hub: Hub, connection: str, secret: str, update: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as session, session.post(
        f"{hub.http_url}/webhooks/telegram/{connection}", data=json.dumps(update).encode(),
        headers={"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": secret},
    ) as response:
        return response.status


@pytest.fixture
async def apis() -> AsyncIterator[tuple[FakeApi, FakeApi]]:
    api_a, api_b = FakeApi(telegram_responder), FakeApi(telegram_responder)
    await api_a.start()
    await api_b.start()
    yield api_a, api_b
    await api_a.stop()
    await api_b.stop()


@pytest.fixture
async def hub_of_two(nats_server: EmbeddedServer, apis: tuple[FakeApi, FakeApi]) -> AsyncIterator[Hub]:
    api_a, api_b = apis
    async with Hub(two_tenants(nats_server.url, api_a.base_url, api_b.base_url)) as hub:
        yield hub


def outbound(tenant: str, conversation: c.Conversation, text: str, **fields: Any) -> c.Message:
    return c.Message(id=c.new_id(), tenant=tenant, conversation=conversation, ts=c.now(), direction="outbound",
                     parts=[c.Text(text=text)], **fields)


async def test_a_tenants_processor_cannot_reach_another_tenants_chats(
        nats_client, hub_of_two: Hub, apis: tuple[FakeApi, FakeApi]) -> None:
    hub, (api_a, api_b) = hub_of_two, apis
    prefix = hub.subjects.prefix
    alpha = await Processor(nats_client, prefix, tenant="alpha").start()
    beta = await Processor(nats_client, prefix, tenant="beta").start()
    # Both tenants have a customer who wrote in, so both conversations have state (a chat to send to).
    assert await post_update(hub, "tg-b", SECRET_B, telegram_update(1, 77, "hello beta")) == 200
    assert await post_update(hub, "tg-a", SECRET_A, telegram_update(1, 55, "hello alpha")) == 200
    beta_inbound, _ = await beta.next()
    alpha_inbound, _ = await alpha.next()
    beta_conversation = beta_inbound.conversation
    assert beta_conversation.id == c.conversation_id("beta", "tg-b", "77")

    attacks = {
        # (a) B's connection and chat, under a conversation id of A's own that derives from them
        "forbidden_connection": outbound("alpha", c.Conversation(
            id=c.conversation_id("alpha", "tg-b", "77"), connection="tg-b", native_id="77"), "a"),
        # (b) B's conversation id, on A's own subject: reaches an empty actor of A's, never B's state
        "unknown_conversation": outbound("alpha", c.Conversation(id=beta_conversation.id), "b"),
        # (d) A's own conversation id naming another chat than the one it derives from
        "conversation_mismatch": outbound("alpha", c.Conversation(
            id=alpha_inbound.conversation.id, connection="tg-a", native_id="77"), "d"),
    }
    # (c) a fan-out target on B's connection, from A's own conversation
    fan_out = outbound("alpha", c.Conversation(id=alpha_inbound.conversation.id), "c",
                       targets=[c.Target(connection="tg-b", to="77")])
    for message in [*attacks.values(), fan_out]:
        await alpha.send(message)

    failed: dict[str, c.Status] = {}
    with contextlib.suppress(TimeoutError):
        while len(failed) < 4:
            status = await alpha.next_status(timeout=10.0)
            if status.state == "failed":
                failed[status.message_id] = status
    codes = {message_id: status.error.code if status.error else "" for message_id, status in failed.items()}
    assert codes == {**{message.id: code for code, message in attacks.items()}, fan_out.id: "forbidden_connection"}

    letters: list[dict[str, Any]] = []

    async def four_letters() -> bool:
        letters[:] = dead_letters(await stream_messages(nats_client, f"{prefix}.alpha.dlq.>",
                                                        hub.subjects.stream_name("dead_letters")))
        return len(letters) >= 4

    for _ in range(100):
        if await four_letters():
            break
        await asyncio.sleep(0.05)
    parked = {json.loads(base64.b64decode(letter["body"]))["id"] for letter in letters}
    assert parked == set(codes)
    assert all(letter["stage"] == "processor" for letter in letters)

    await asyncio.sleep(0.3)  # anything sent by mistake would have reached the fake API by now
    assert [request.path for request in api_b.requests if "sendMessage" in request.path] == []
    assert beta.statuses.empty()
    # B's conversation is untouched: its customer's next message and B's reply work as before.
    reply = await beta.reply(beta_inbound, c.Text(text="only beta answers"))
    await eventually(lambda: any("sendMessage" in r.path for r in api_b.requests))
    sent = next(r for r in api_b.requests if "sendMessage" in r.path)
    assert sent.json()["text"] == "only beta answers" and reply.tenant == "beta"
    assert TOKEN_B in sent.path and not any(TOKEN_B in r.path for r in api_a.requests)
