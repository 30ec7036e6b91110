"""Client sessions at `WebSocket /ws` and `POST /v1/sessions`, on real parts: a real nats-server, the hub
in-process with its real HTTP server, real aiohttp WebSocket clients, a processing app on NATS and a
local fake of the Telegram Bot API driving real conversations."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.hub.cli import main as cli_main
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.keeper import KEEPER_CONSUMER
from babelhub.sessions import clients
from babelhub.sessions.auth import Refused, SessionRequest, SessionTokens
from babelhub.sessions.frames import schemas
from babelhub.sessions.tokens import load_session_key
from tests.fakeapi import FakeApi
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    Processor,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_responder,
    telegram_update,
    unique_prefix,
)

KEY = "acme-api-key"
OTHER_KEY = "globex-api-key"
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
CHAT = 42
CONVERSATION = c.conversation_id(TENANT, "tg", str(CHAT))
SCHEMAS = schemas()


def config(nats_url: str, api_base: str, **hub: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(), **hub),
        tenants=[cfg.Tenant(id=TENANT, api_keys=[KEY]), cfg.Tenant(id="globex", api_keys=[OTHER_KEY])],
        connections=[cfg.Connection(id="tg", tenant=TENANT, channel="telegram", mode="webhook", api_base=api_base,
                                    secrets={"bot_token": BOT_TOKEN, "secret_token": SECRET})],
    )


@pytest.fixture
async def telegram_api(fake_api: FakeApi) -> FakeApi:
    fake_api.responder = telegram_responder
    return fake_api


@pytest.fixture
async def hub(nats_server: EmbeddedServer, telegram_api: FakeApi, start_hub: StartHub) -> Hub:
    return await start_hub(config(nats_server.url, telegram_api.base_url))


@asynccontextmanager
async def connect(hub: Hub, key: str = KEY, *, query: str = "",
                  headers: dict[str, str] | None = None) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    sent = ({"Authorization": f"Bearer {key}"} if key else {}) if headers is None else headers
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"{hub.http_url}/ws{query}", headers=sent) as socket:
        yield socket


async def frame(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next frame, checked against its published JSON Schema."""
    message = await asyncio.wait_for(socket.receive(), 15)
    assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data, message.extra)
    document: dict[str, Any] = json.loads(message.data)
    jsonschema.validate(document, SCHEMAS[f"hub.{document['type']}"])
    return document


async def closed(socket: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """The close code and reason the hub ended the socket with (frames before it are skipped)."""
    while True:
        message = await asyncio.wait_for(socket.receive(), 15)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return socket.close_code, str(message.extra or "")


async def send(socket: aiohttp.ClientWebSocketResponse, document: dict[str, Any]) -> None:
    jsonschema.validate(document, SCHEMAS[f"client.{document['type']}"])
    await socket.send_str(json.dumps(document))


async def subscribe(socket: aiohttp.ClientWebSocketResponse, *conversations: str,
                    since: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    document: dict[str, Any] = {"type": "subscribe", "conversations": list(conversations)}
    await send(socket, {**document, "since": since} if since else document)
    return [await frame(socket) for _ in conversations]


async def post_update(hub: Hub, update: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            hub.http_url + "/webhooks/telegram/tg", json=update, headers=HEADERS) as response:
        assert response.status == 200


async def until_pong(socket: aiohttp.ClientWebSocketResponse, ping: str) -> list[dict[str, Any]]:
    """Every frame before the pong that answers `ping`: what the hub had sent until then."""
    await send(socket, {"type": "ping", "id": ping})
    frames = []
    while (received := await frame(socket)) != {"type": "pong", "id": ping}:
        frames.append(received)
    return frames


async def issue(hub: Hub, body: Any, key: str | None = KEY) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session, session.post(
            hub.http_url + "/v1/sessions", data=json.dumps(body).encode(), headers=headers) as response:
        return response.status, await response.json()


async def converse(hub: Hub, app: Processor, update_id: int, text: str) -> None:
    """One turn of a real conversation: a Telegram update in, the processor's answer out, sent."""
    await post_update(hub, telegram_update(update_id, CHAT, text))
    inbound, _ = await app.next()
    await app.reply(inbound, c.Text(text=f"re: {text}"))
    assert (await app.next_status()).state == "sent"


# ------------------------------------------------------------------------------------------- live


async def test_a_subscribed_session_sees_the_conversation_live(hub: Hub, nats_client) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    async with connect(hub) as socket:
        [subscribed] = await subscribe(socket, CONVERSATION)
        assert subscribed["type"] == "subscribed" and subscribed["conversation"] == CONVERSATION
        assert subscribed["recovered"] is False
        await converse(hub, app, 1, "hello")
        got = [await frame(socket) for _ in range(3)]
    by_type = {item["type"]: item for item in got}
    assert set(by_type) == {"message", "status"} and len(got) == 3
    inbound, outbound = [item for item in got if item["type"] == "message"]
    assert inbound["envelope"]["direction"] == "inbound" and inbound["envelope"]["parts"][0]["text"] == "hello"
    assert outbound["envelope"]["direction"] == "outbound" and outbound["envelope"]["parts"][0]["text"] == "re: hello"
    assert outbound["offset"] > inbound["offset"] > subscribed["since"]["messages"]
    assert by_type["status"]["envelope"]["state"] == "sent"
    assert by_type["status"]["envelope"]["message_id"] == outbound["envelope"]["id"]
    assert by_type["status"]["offset"] > subscribed["since"]["statuses"]
    assert {item["epoch"] for item in got} == {subscribed["since"]["epoch"]}


# ------------------------------------------------------------------------------------------- resume


def cursor_after(subscribed: dict[str, Any], frames: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client keeps: the epoch, and the last offset it got from each stream."""
    since = dict(subscribed["since"])
    for item in frames:
        stream = "statuses" if item["type"] == "status" else "messages"
        since[stream] = max(since[stream], item["offset"])
    return since


async def test_resume_after_a_forced_disconnect_loses_and_repeats_nothing(hub: Hub, nats_client) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    async with connect(hub) as socket:
        [subscribed] = await subscribe(socket, CONVERSATION)
        await converse(hub, app, 1, "before")
        before = [await frame(socket) for _ in range(3)]
        # Gone without a closing handshake, as a phone losing its network.
        transport = socket._response.connection.transport  # type: ignore[union-attr]
        transport.abort()
    since = cursor_after(subscribed, before)

    for n in range(2, 5):  # the conversation goes on while the client is away
        await converse(hub, app, n, f"missed {n}")

    async with connect(hub) as socket:
        [resumed] = await subscribe(socket, CONVERSATION, since={CONVERSATION: since})
        assert resumed["recovered"] is True and resumed["since"] == since
        missed = [await frame(socket) for _ in range(9)]
        await converse(hub, app, 5, "live again")
        live = [await frame(socket) for _ in range(3)]
    for stream, kind in (("messages", "message"), ("statuses", "status")):
        offsets = [item["offset"] for item in missed if item["type"] == kind]
        assert offsets == sorted(set(offsets)) and min(offsets) > since[stream]
    texts = [item["envelope"]["parts"][0]["text"] for item in missed if item["type"] == "message"]
    assert texts == ["missed 2", "re: missed 2", "missed 3", "re: missed 3", "missed 4", "re: missed 4"]
    assert sum(item["type"] == "status" for item in missed) == 3
    assert [item["envelope"]["parts"][0]["text"] for item in live if item["type"] == "message"] == [
        "live again", "re: live again"]


async def test_reconnecting_again_and_again_under_traffic_delivers_each_message_once(hub: Hub) -> None:
    count = 20

    async def chat() -> None:
        for n in range(1, count + 1):
            await post_update(hub, telegram_update(n, CHAT, f"m{n}"))
            await asyncio.sleep(0.02)

    async with connect(hub) as socket:
        [subscribed] = await subscribe(socket, CONVERSATION)
    since = subscribed["since"]
    traffic = asyncio.create_task(chat())
    delivered: list[dict[str, Any]] = []
    reconnects = 0
    try:
        while len(delivered) < count:
            reconnects += 1
            assert reconnects < 200, delivered
            async with connect(hub) as socket:
                [subscribed] = await subscribe(socket, CONVERSATION, since={CONVERSATION: since})
                assert subscribed["recovered"] is True
                for _ in range(3):  # a few frames, then the network drops
                    try:
                        item = await asyncio.wait_for(frame(socket), 0.1)
                    except TimeoutError:
                        break
                    delivered.append(item)
                    since = {**since, "messages": item["offset"]}
                socket._response.connection.transport.abort()  # type: ignore[union-attr]
    finally:
        await traffic
    assert [item["envelope"]["parts"][0]["text"] for item in delivered] == [f"m{n}" for n in range(1, count + 1)]
    offsets = [item["offset"] for item in delivered]
    assert offsets == sorted(set(offsets))
    assert reconnects > 3


async def test_a_cursor_beyond_the_retained_window_is_not_recovered(hub: Hub, nats_client) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    async with connect(hub) as socket:
        [subscribed] = await subscribe(socket, CONVERSATION)
        await converse(hub, app, 1, "old")
        since = cursor_after(subscribed, [await frame(socket) for _ in range(3)])
    await converse(hub, app, 2, "lost")
    js = nats_client.jetstream()
    await js.purge_stream(hub.subjects.stream_name("messages"))  # as max_age does after seven days
    async with connect(hub) as socket:
        [resumed] = await subscribe(socket, CONVERSATION, since={CONVERSATION: since})
        assert resumed["recovered"] is False
        info = await js.stream_info(hub.subjects.stream_name("messages"))
        assert resumed["since"]["messages"] == info.state.last_seq
        await converse(hub, app, 3, "after")
        after = [await frame(socket) for _ in range(3)]
    assert [item["envelope"]["parts"][0]["text"] for item in after if item["type"] == "message"] == [
        "after", "re: after"]


async def test_a_cursor_of_another_epoch_is_not_recovered(hub: Hub) -> None:
    async with connect(hub) as socket:
        [subscribed] = await subscribe(socket, CONVERSATION)
        stale = {**subscribed["since"], "epoch": "0" * 16}
        [resumed] = await subscribe(socket, CONVERSATION, since={CONVERSATION: stale})
        assert resumed["recovered"] is False and resumed["since"]["epoch"] == subscribed["since"]["epoch"]
        [again] = await subscribe(socket, CONVERSATION, since={CONVERSATION: subscribed["since"]})
        assert again["recovered"] is True
        # An offset past anything the stream holds is from no epoch of these streams.
        ahead = {**subscribed["since"], "messages": subscribed["since"]["messages"] + 1000}
        [future] = await subscribe(socket, CONVERSATION, since={CONVERSATION: ahead})
        assert future["recovered"] is False


# ------------------------------------------------------------------------------------------- auth


async def test_a_token_for_one_conversation_cannot_read_another(hub: Hub) -> None:
    other = c.conversation_id(TENANT, "tg", "43")
    status, issued = await issue(hub, {"conversations": [CONVERSATION], "rights": ["read"], "ttl_seconds": 60})
    assert status == 201 and issued["tenant"] == TENANT and issued["conversations"] == [CONVERSATION]
    token = issued["token"]
    for query, headers, first in ((f"?token={token}", {}, None), ("", {"Authorization": f"Bearer {token}"}, None),
                                  ("", {}, {"type": "auth", "token": token})):
        async with connect(hub, query=query, headers=headers) as socket:
            if first is not None:
                await send(socket, first)
            [subscribed] = await subscribe(socket, CONVERSATION)
            assert subscribed["type"] == "subscribed"
            await send(socket, {"type": "subscribe", "conversations": [other]})
            code, reason = await closed(socket)
        assert code == clients.FORBIDDEN and other in reason


async def test_expired_forged_and_unknown_credentials_are_refused_with_1008(hub: Hub, nats_client) -> None:
    key = await load_session_key(nats_client.jetstream(), hub.subjects, "session-token-key", role="clients")
    request = SessionRequest(conversations=[CONVERSATION])
    expired, _ = SessionTokens(key, clock=lambda: time.time() - 2 * 3600).issue(TENANT, request)
    forged, _ = SessionTokens(b"not the hub's key" * 2).issue(TENANT, request)
    _, issued = await issue(hub, {"conversations": [CONVERSATION]})
    version, claims, signature = issued["token"].split(".")
    widened = msgspec.json.decode(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    widened["conversations"].append("someoneelses")  # the claims changed, the signature kept
    tampered = ".".join([version, base64.urlsafe_b64encode(msgspec.json.encode(widened)).decode().rstrip("="),
                         signature])
    cases = {expired: "expired", forged: "signature", tampered: "signature", "no-such-key": "unknown API key"}
    for credential, why in cases.items():
        async with connect(hub, credential) as socket:
            code, reason = await closed(socket)
        assert code == 1008 and why in reason, (credential, code, reason)
    async with connect(hub, "", query="?token=" + KEY) as socket:  # a key in a URL would end up in logs
        code, reason = await closed(socket)
    assert code == 1008 and "malformed session token" in reason
    async with connect(hub, "") as socket:  # nor in a browser's frames
        await send(socket, {"type": "auth", "token": KEY})
        code, reason = await closed(socket)
    assert code == 1008 and "malformed session token" in reason


async def test_a_socket_without_a_credential_must_send_auth_first(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    async with connect(hub, "") as socket:
        await send(socket, {"type": "ping"})
        code, reason = await closed(socket)
    assert code == 1008 and "auth" in reason
    monkeypatch.setattr(clients, "AUTH_SECONDS", 0.2)
    async with connect(hub, "") as socket:
        code, reason = await closed(socket)
    assert code == 1008 and "within" in reason


async def test_issuing_a_token_needs_a_key_and_a_valid_body(hub: Hub) -> None:
    for key in (None, "wrong"):
        status, body = await issue(hub, {"conversations": [CONVERSATION]}, key=key)
        assert status == 401 and body == {"error": {"code": "unauthenticated", "message": body["error"]["message"],
                                                    "path": ""}}
    bad = {
        "$.ttl_seconds": {"conversations": [CONVERSATION], "ttl_seconds": 86400},
        "$.conversations[1]": {"conversations": [CONVERSATION, "a.b.>"]},
        "$.rights[0]": {"conversations": [CONVERSATION], "rights": ["admin"]},
        "$.conversations": {"conversations": []},
    }
    for path, body in bad.items():
        status, answer = await issue(hub, body)
        assert status == 400 and answer["error"]["path"] == path, (path, answer)
        assert answer["error"]["code"] == "invalid" and set(answer["error"]) == {"code", "message", "path"}
    status, answer = await issue(hub, {"conversations": [CONVERSATION]})
    assert status == 201 and answer["rights"] == ["read"]
    status, _ = await issue(hub, {"conversations": [CONVERSATION]}, key=answer["token"])
    assert status == 401, "a session token cannot issue tokens (it could renew itself for ever)"


async def test_issuing_a_token_answers_every_error_in_the_rest_api_s_shape(hub: Hub) -> None:
    too_large = {"conversations": [CONVERSATION], "padding": "x" * hub.config.hub.max_body_bytes}
    status, answer = await issue(hub, too_large)
    assert (status, answer) == (413, {"error": {"code": "too_large", "message": answer["error"]["message"],
                                                "path": ""}})
    async with aiohttp.ClientSession() as session, session.get(
            hub.http_url + "/v1/sessions", headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert (response.status, response.headers["Allow"]) == (405, "POST")
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    status, answer = await issue(hub, "not an object")
    assert (status, answer["error"]["code"], answer["error"]["path"]) == (400, "invalid", "$")


# ------------------------------------------------------------------------------------------- send


async def test_a_session_sends_into_its_conversation_like_a_processor(hub: Hub, nats_client,
                                                                      telegram_api: FakeApi) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await post_update(hub, telegram_update(1, CHAT, "I need a person"))
    await app.next()  # the conversation exists: the hub knows where chat 42 is
    async with connect(hub) as socket:
        await subscribe(socket, CONVERSATION)
        agent = c.Message(id=c.new_id(), tenant=TENANT, conversation=c.Conversation(id=CONVERSATION), ts=c.now(),
                          direction="outbound", parts=[c.Text(text="an agent here")])
        await send(socket, {"type": "send", "envelope": msgspec.to_builtins(agent)})
        echoed = await frame(socket)
        assert echoed["type"] == "message" and echoed["envelope"]["id"] == agent.id
        await eventually(lambda: any(r.path.endswith("/sendMessage") and r.json()["text"] == "an agent here"
                                     for r in telegram_api.requests))
        assert (await frame(socket))["type"] == "status"
        typing = c.Activity(id=c.new_id(), tenant=TENANT, conversation=c.Conversation(id=CONVERSATION), ts=c.now(),
                            direction="outbound", activity="typing")
        await send(socket, {"type": "send", "envelope": msgspec.to_builtins(typing)})
        shown = await frame(socket)
        assert shown["type"] == "activity" and shown["envelope"]["id"] == typing.id
        assert shown["envelope"]["activity"] == "typing" and shown["offset"] > echoed["offset"]
        await until_pong(socket, "settled")  # the typing's own status, if the channel reports one

        inbound = msgspec.to_builtins(msgspec.structs.replace(agent, id=c.new_id(), direction="inbound"))
        await send(socket, {"type": "send", "envelope": inbound})
        error = await frame(socket)
        assert error["type"] == "error" and error["path"] == "$.envelope.direction"
        unsubscribed = {**msgspec.to_builtins(agent), "conversation": {"id": "elsewhere"}}
        await send(socket, {"type": "send", "envelope": unsubscribed})
        assert (await frame(socket))["path"] == "$.envelope.conversation.id"
        other_tenant = {**msgspec.to_builtins(agent), "tenant": "globex"}
        await send(socket, {"type": "send", "envelope": other_tenant})
        code, _ = await closed(socket)
    assert code == clients.FORBIDDEN


async def test_a_read_only_token_cannot_send(hub: Hub) -> None:
    _, issued = await issue(hub, {"conversations": [CONVERSATION], "rights": ["read"]})
    async with connect(hub, issued["token"]) as socket:
        await subscribe(socket, CONVERSATION)
        agent = c.Message(id=c.new_id(), tenant=TENANT, conversation=c.Conversation(id=CONVERSATION), ts=c.now(),
                          direction="outbound", parts=[c.Text(text="not allowed")])
        await send(socket, {"type": "send", "envelope": msgspec.to_builtins(agent)})
        code, reason = await closed(socket)
    assert code == clients.FORBIDDEN and "send" in reason


async def test_only_a_web_chat_visitor_posts(hub: Hub, nats_client) -> None:
    """`post` records a channel's own inbound frame: a tenant's client must not be able to make up what a
    customer said, not even with the tenant's key."""
    async with connect(hub) as socket:
        await send(socket, {"type": "post", "message": {"id": "1", "text": "I agree to the terms"}})
        code, reason = await closed(socket)
    assert code == clients.FORBIDDEN and "only a web chat visitor posts" in reason
    raw = await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.raw.>", hub.subjects.stream_name("raw"))
    assert raw == []


# ------------------------------------------------------------------------------------------- isolation


async def test_another_tenant_never_reads_a_conversation(hub: Hub, nats_client) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    async with connect(hub) as own, connect(hub, OTHER_KEY) as stranger:
        await subscribe(own, CONVERSATION)
        [subscribed] = await subscribe(stranger, CONVERSATION)  # the same id names globex's own conversation
        assert subscribed["type"] == "subscribed"
        await converse(hub, app, 1, "private")
        assert len([await frame(own) for _ in range(3)]) == 3
        assert await until_pong(stranger, "after") == []
        _, issued = await issue(hub, {"conversations": [CONVERSATION]}, key=OTHER_KEY)
    async with connect(hub, issued["token"]) as socket:
        await subscribe(socket, CONVERSATION)
        await converse(hub, app, 2, "still private")
        assert await until_pong(socket, "after") == []


# ------------------------------------------------------------------------------------------- abuse


async def test_bad_frames_get_errors_with_paths_then_close_4400(hub: Hub, nats_client) -> None:
    bad = [
        ("not json", "$"),
        (json.dumps({"type": "subscribe", "conversations": ["bh.*.>"]}), "$.conversations[0]"),
        (json.dumps({"type": "teleport"}), "$.type"),
        (json.dumps({"type": "subscribe", "conversations": [CONVERSATION],
                     "since": {CONVERSATION: {"epoch": "e", "messages": -1}}}), "$.since[...].messages"),
    ]
    async with connect(hub) as socket:
        for text, path in bad:
            await socket.send_str(text)
            error = await frame(socket)
            assert error["type"] == "error" and error["path"] == path, (text, error)
        await socket.send_str(json.dumps({"type": "ping", "extra": 1}))
        code, reason = await closed(socket)
    assert code == clients.TOO_MANY_ERRORS and "`extra`" in reason
    assert await metric(hub, 'babelhub_client_session_closes_total{code="4400"}') == 1
    parked = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.session",
                                                hub.subjects.stream_name("dead_letters")))
    assert [letter["path"] for letter in parked] == [path for _, path in bad] + ["$"]


async def test_an_auth_frame_once_authenticated_is_an_error_kept_without_its_token(hub: Hub, nats_client) -> None:
    _, issued = await issue(hub, {"conversations": [CONVERSATION]})
    async with connect(hub) as socket:
        await send(socket, {"type": "auth", "token": issued["token"]})
        error = await frame(socket)
        assert error["type"] == "error" and error["path"] == "$.type"
    subject = f"{hub.subjects.prefix}.{TENANT}.dlq.session"
    parked = dead_letters(await stream_messages(nats_client, subject, hub.subjects.stream_name("dead_letters")))
    assert len(parked) == 1 and parked[0]["error"] == "this session is authenticated already"
    assert issued["token"].split(".")[2].encode() not in msgspec.msgpack.encode(parked)


async def metric(hub: Hub, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(hub.http_url + "/metrics") as response:
        text = await response.text()
    [value] = [line.rpartition(" ")[2] for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{")]
    return float(value)


async def test_too_many_subscriptions_are_refused(hub: Hub) -> None:
    ids = [f"c{n}" for n in range(clients.MAX_SUBSCRIPTIONS)]
    async with connect(hub) as socket:
        subscribed = await subscribe(socket, *ids)
        assert [item["conversation"] for item in subscribed] == ids
        await send(socket, {"type": "subscribe", "conversations": ["one-more"]})
        error = await frame(socket)
        assert error["type"] == "error" and error["path"] == "$.conversations"
        await send(socket, {"type": "unsubscribe", "conversations": ["c0"]})
        assert (await frame(socket)) == {"type": "unsubscribed", "conversation": "c0"}
        [again] = await subscribe(socket, "one-more")
        assert again["type"] == "subscribed"
        await until_pong(socket, "subscribed")
        assert await metric(hub, "babelhub_client_sessions") == 1
        assert await metric(hub, "babelhub_client_subscriptions") == clients.MAX_SUBSCRIPTIONS
        await send(socket, {"type": "subscribe", "conversations": ["c1"]})
        await frame(socket)
        await send(socket, {"type": "unsubscribe", "conversations": ["c1"]})
        await frame(socket)
        await send(socket, {"type": "subscribe", "conversations": ["c2"]})  # again: moves, not doubles
        assert [item["type"] for item in await until_pong(socket, "done")] == ["subscribed"]
        assert await metric(hub, "babelhub_client_subscriptions") == clients.MAX_SUBSCRIPTIONS - 1
    await eventually(lambda: not hub.ctx.metrics.registry.get_sample_value("babelhub_client_sessions"))


async def store_inbound(hub: Hub, nats_client: NATS, count: int, size: int = 10) -> None:
    """`count` inbound messages of the conversation stored as the hub stores them (on its `in` subject)."""
    js = nats_client.jetstream()
    for n in range(count):
        message = c.Message(id=c.new_id(), tenant=TENANT, conversation=c.Conversation(id=CONVERSATION), ts=c.now(),
                            parts=[c.Text(text=f"{n:06d}".ljust(size, "."))])
        await js.publish(hub.subjects.inbound(TENANT, CONVERSATION), c.encode(message))


async def test_sessions_cost_the_streams_no_consumer_each(hub: Hub) -> None:
    """nats-server refuses more than 1,000 consumers on a stream by default: a hub process reads each
    stream once for all its sessions, however many follow a conversation."""
    js, subjects = hub.ctx.js, hub.subjects

    async def consumers() -> tuple[int, int]:
        infos = [await js.stream_info(subjects.stream_name(role)) for role in ("messages", "statuses")]
        return infos[0].state.consumer_count, infos[1].state.consumer_count

    async with connect(hub) as first:
        await subscribe(first, CONVERSATION)
        with_one = await consumers()
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(12):
                socket = await stack.enter_async_context(connect(hub))
                await subscribe(socket, CONVERSATION, "another-conversation")
            assert await consumers() == with_one


async def test_a_client_that_does_not_read_is_closed_and_holds_up_no_one(
        hub: Hub, nats_client: NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients, "OUTBOX_FRAMES", 8)
    async with connect(hub) as stalled, connect(hub) as reading:
        await subscribe(stalled, CONVERSATION)
        await subscribe(reading, CONVERSATION)
        stalled._response.connection.transport.pause_reading()  # type: ignore[union-attr]
        count = 150  # 60 KB each: far more than the sockets' buffers hold
        storing = asyncio.create_task(store_inbound(hub, nats_client, count, size=60_000), name="store")
        texts = [(await frame(reading))["envelope"]["parts"][0]["text"][:6] for _ in range(count)]
        await storing
        assert texts == [f"{n:06d}" for n in range(count)]
        stalled._response.connection.transport.resume_reading()  # type: ignore[union-attr]
        received = [await asyncio.wait_for(stalled.receive(), 15)]
        while received[-1].type == aiohttp.WSMsgType.TEXT:  # what the sockets' buffers held, then the close
            received.append(await asyncio.wait_for(stalled.receive(), 15))
    assert received[-1].type == aiohttp.WSMsgType.CLOSE
    assert received[-1].data == clients.TOO_SLOW and "too slow" in received[-1].extra
    assert len(received) - 1 < count  # it was cut off, not served everything


async def test_limits_close_the_socket(nats_server: EmbeddedServer, telegram_api: FakeApi, start_hub: StartHub,
                                       nats_client) -> None:
    hub = await start_hub(config(nats_server.url, telegram_api.base_url, max_frame_bytes=4096,
                                 max_sockets_per_ip=2, session_frame_rate=0.5, session_frame_burst=3))
    async with connect(hub) as socket:
        await socket.send_str(json.dumps({"type": "ping", "id": "x" * 5000}))
        code, reason = await closed(socket)
    assert code == 1009 and "hub.max_frame_bytes" in reason
    for _ in range(300):  # aiohttp closes the socket before the hub has parked the refusal
        parked = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.session",
                                                    hub.subjects.stream_name("dead_letters")))
        if parked:
            break
        await asyncio.sleep(0.05)
    assert [letter["error"].startswith("WebSocket frame refused") for letter in parked] == [True]
    async with connect(hub) as socket:
        await socket.send_bytes(b"\x00\x01")
        code, _ = await closed(socket)
    assert code == 1003
    async with connect(hub) as socket:
        for n in range(3):
            await send(socket, {"type": "ping", "id": str(n)})
            assert (await frame(socket))["type"] == "pong"
        await send(socket, {"type": "ping"})
        code, reason = await closed(socket)
    assert code == 1008 and "rate" in reason
    async with connect(hub) as first, connect(hub) as second, connect(hub) as third:
        code, reason = await closed(third)
        assert code == 1008 and "hub.max_sockets_per_ip" in reason
        assert not first.closed and not second.closed


# ------------------------------------------------------------------------------------------- schema


def test_babelhub_schema_frames_prints_one_schema_per_frame_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["schema", "--frames"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"client.auth", "client.subscribe", "client.unsubscribe", "client.send", "client.post",
                            "client.ping", "hub.message", "hub.activity", "hub.status", "hub.subscribed",
                            "hub.unsubscribed", "hub.error", "hub.pong", "hub.session"}
    for document in printed.values():
        jsonschema.Draft202012Validator.check_schema(document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "subscribe", "conversations": ["a.b"]}, printed["client.subscribe"])


# ------------------------------------------------------------------------------------------- the documented clients

DOC = Path(__file__).resolve().parents[1] / "README.md"


def documented(lang: str) -> str:
    """The README's `lang` client of the client-session protocol (its section holds one of each)."""
    section = DOC.read_text("utf-8").split("### Client sessions (`WebSocket /ws`)", 1)[1].split("\n### ", 1)[0]
    [block] = re.findall(rf"^```{lang}\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    return block


def texts_of(frames: list[dict[str, Any]]) -> list[str]:
    return [item["envelope"]["parts"][0]["text"] for item in frames if item["type"] == "message"]


async def test_the_documented_python_client_follows_and_resumes(hub: Hub, nats_client) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    namespace: dict[str, Any] = {}
    exec(compile(documented("python"), str(DOC), "exec"), namespace)
    got: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []

    def on_frame(frame: dict[str, Any], cursor: dict[str, Any]) -> None:
        got.append(frame)
        kept.append(cursor)

    first = asyncio.create_task(namespace["follow"](hub.http_url, KEY, CONVERSATION, on_frame=on_frame))
    await eventually(lambda: len(got) == 1)
    await converse(hub, app, 1, "one")
    await eventually(lambda: len(got) == 4)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await converse(hub, app, 2, "two")
    again = asyncio.create_task(namespace["follow"](hub.http_url, KEY, CONVERSATION, kept[-1], on_frame=on_frame))
    try:
        await eventually(lambda: len(got) == 8)
    finally:
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)
    assert got[4]["type"] == "subscribed" and got[4]["recovered"] is True
    assert texts_of(got) == ["one", "re: one", "two", "re: two"]


async def test_the_documented_javascript_client_runs_in_a_browser(hub: Hub, nats_client) -> None:
    from playwright.async_api import async_playwright

    from tests.test_browser import CHROMIUM, FLAGS

    app = await Processor(nats_client, hub.subjects.prefix).start()
    _, issued = await issue(hub, {"conversations": [CONVERSATION], "rights": ["read"]})
    run = """([hub, token, conversation, cursor]) => {
        window.socket = follow(hub, token, conversation, cursor, (frame, kept) => {
            window.got.push(frame); window.cursor = kept; });
    }"""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(hub.http_url + "/healthz")
            await page.add_script_tag(content=documented("js") + "\nwindow.got = [];")
            await page.evaluate(run, [hub.http_url, issued["token"], CONVERSATION, None])
            await page.wait_for_function("window.got.length === 1")
            await converse(hub, app, 1, "one")
            await page.wait_for_function("window.got.length === 4")
            await page.evaluate("window.socket.close(1000)")
            await converse(hub, app, 2, "two")
            await page.evaluate(run, [hub.http_url, issued["token"], CONVERSATION,
                                      await page.evaluate("window.cursor")])
            await page.wait_for_function("window.got.length === 8")
            got = await page.evaluate("window.got")
        finally:
            await browser.close()
    assert got[4]["type"] == "subscribed" and got[4]["recovered"] is True
    assert texts_of(got) == ["one", "re: one", "two", "re: two"]


async def test_a_stopping_hub_closes_client_sessions_with_1001(nats_server: EmbeddedServer, telegram_api: FakeApi,
                                                              nats_client) -> None:
    hub = Hub(config(nats_server.url, telegram_api.base_url))
    await hub.start()
    try:
        async with connect(hub) as socket:
            await subscribe(socket, CONVERSATION)
            stopping = asyncio.create_task(hub.stop())
            code, reason = await closed(socket)
            await asyncio.wait_for(stopping, 60)
    finally:
        await hub.stop()
    assert code == 1001 and "shutting down" in reason
    js, left = nats_client.jetstream(), [1]

    async def count_left() -> None:
        consumers = await js.consumers_info(hub.subjects.stream_name("messages"))
        left[0] = len([info for info in consumers if not info.name.startswith(("raw-", "conversations-"))
                       and info.name != KEEPER_CONSUMER])  # the hub's own durable ones stay

    # The session's consumers are gone with it (the server removes one nobody listens to).
    for _ in range(100):
        await count_left()
        if not left[0]:
            break
        await asyncio.sleep(0.2)
    assert left == [0]


# ------------------------------------------------------------------------------------------- tokens, pure


@given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
def test_a_token_changed_anywhere_is_refused(position: int, replacement: str) -> None:
    tokens = SessionTokens(b"k" * 32, clock=lambda: 1_800_000_000.0)
    token, _ = tokens.issue(TENANT, SessionRequest(conversations=[CONVERSATION], rights=["read", "send"]))
    index = position % len(token)
    changed = token[:index] + replacement + token[index + 1:]
    if changed == token or changed.rstrip("=") == token:
        return
    with pytest.raises(Refused):
        tokens.credential(changed)


def test_a_token_carries_its_scope_until_it_expires() -> None:
    now = [1_800_000_000.0]
    tokens = SessionTokens(b"k" * 32, clock=lambda: now[0])
    token, expires = tokens.issue(TENANT, SessionRequest(conversations=[CONVERSATION, CONVERSATION], ttl_seconds=60))
    credential = tokens.credential(token)
    assert credential.tenant == TENANT and credential.conversations == {CONVERSATION}
    assert credential.may("read", CONVERSATION) and not credential.may("send", CONVERSATION)
    assert not credential.may("read", "another")
    now[0] = expires - 1
    tokens.credential(token)
    now[0] = expires
    with pytest.raises(Refused, match="expired"):
        tokens.credential(token)
