"""The history API (`GET /v1/conversations…`) on real parts: a real nats-server, the hub in-process,
Telegram webhooks in and a local fake of the Bot API answering the sends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import pytest

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi
from tests.historykit import (
    ACME,
    OTHER,
    api,
    conversation_with,
    get,
    history_api,
    private_update,
    refused,
    two_tenants,
    until,
    webhook,
)
from tests.hubkit import StartHub, dead_letters, stream_messages, telegram_responder
from tests.test_rest_messages import APP_SECRET
from tests.test_rest_messages import FIXTURES as WHATSAPP_FIXTURES
from tests.test_rest_messages import config as whatsapp_config
from tests.test_rest_messages import whatsapp as whatsapp_connection

PHONE_NUMBER_ID = whatsapp_connection("wa", ACME, "").options["phone_number_id"]


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    fake_api.responder = telegram_responder
    return await start_hub(two_tenants(nats_server.url, fake_api.base_url))


async def test_conversations_listed_filtered_searched_and_paged(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(501, "Do you sell green apples?", name="Ada"))
    await webhook(http, hub, private_update(502, "Where is my parcel", name="Grace"))
    await webhook(http, hub, private_update(503, "hello", name="Linus"), tenant=OTHER)
    ada = await conversation_with(http, hub, 501, 1)
    await conversation_with(http, hub, 502, 1)
    await conversation_with(http, hub, 503, 1, tenant=OTHER)

    listed = await get(http, hub, "/v1/conversations")
    assert {item["native_id"] for item in listed["data"]} == {"501", "502"}  # never the other tenant's
    assert listed["metadata"] == {"has_more": False, "total_count": 2}
    assert ada["channel"] == "telegram" and ada["connection"] == "tg" and ada["type"] == "direct"
    assert [p["name"] for p in ada["participants"]] == ["Ada"]
    assert ada["window"]["open"] is True

    searched = await get(http, hub, "/v1/conversations?q=GREEN%20apples")
    assert [item["native_id"] for item in searched["data"]] == ["501"]
    assert [i["native_id"] for i in (await get(http, hub, "/v1/conversations?q=grace"))["data"]] == ["502"]
    participant = ada["participants"][0]["id"]
    assert [i["native_id"] for i in (await get(http, hub, f"/v1/conversations?participant={participant}"))["data"]] \
        == ["501"]
    assert (await get(http, hub, "/v1/conversations?connection=tg&channel=telegram"))["metadata"]["total_count"] == 2
    assert (await get(http, hub, "/v1/conversations?channel=slack"))["data"] == []
    assert (await get(http, hub, "/v1/conversations?since=2999-01-01T00:00:00Z"))["data"] == []
    assert len((await get(http, hub, "/v1/conversations?until=2999-01-01T00:00:00%2B02:00"))["data"]) == 2

    first = await get(http, hub, "/v1/conversations?limit=1")
    assert first["metadata"]["has_more"] is True
    second = await get(http, hub, f"/v1/conversations?limit=1&cursor={first['metadata']['next_cursor']}")
    assert second["metadata"] == {"has_more": False, "total_count": 2}
    assert {first["data"][0]["id"], second["data"][0]["id"]} == {item["id"] for item in listed["data"]}


async def test_messages_newest_first_with_statuses_and_pages_stable_while_messages_arrive(
        hub: Hub, http: aiohttp.ClientSession) -> None:
    for n in range(5):
        await webhook(http, hub, private_update(601, f"question {n}"))
    conversation = (await conversation_with(http, hub, 601, 5))["id"]
    status, sent = await api(http, hub, "POST", "/v1/messages", body={
        "conversation": {"id": conversation}, "parts": [{"type": "text", "text": "an answer"}]})
    assert status == 202, sent

    async def answered_and_sent() -> Any:
        page = await get(http, hub, f"/v1/conversations/{conversation}/messages?limit=1")
        item = page["data"][0]
        return item if item["envelope"]["id"] == sent["id"] and \
            [s["state"] for s in item["statuses"]] == ["accepted", "sent"] else None

    newest = await until(answered_and_sent)
    assert newest["envelope"]["direction"] == "outbound"

    before = await get(http, hub, f"/v1/conversations/{conversation}/messages?limit=100")
    texts = [item["envelope"]["parts"][0]["text"] for item in before["data"]]
    assert texts == ["an answer", "question 4", "question 3", "question 2", "question 1", "question 0"]
    assert all(item["statuses"] == [] for item in before["data"][1:])  # inbound ones have none

    # Page through two at a time while new messages keep arriving: every page continues where the last
    # ended, nothing is repeated or skipped, and the new messages are on none of the later pages.
    seen: list[str] = []
    page = await get(http, hub, f"/v1/conversations/{conversation}/messages?limit=2")
    while True:
        seen += [item["envelope"]["id"] for item in page["data"]]
        await webhook(http, hub, private_update(601, f"arrived while paging {len(seen)}"))
        await conversation_with(http, hub, 601, 6 + len(seen) // 2)
        if not page["metadata"]["has_more"]:
            break
        cursor = page["metadata"]["next_cursor"]
        page = await get(http, hub, f"/v1/conversations/{conversation}/messages?limit=2&cursor={cursor}")
    assert seen == [item["envelope"]["id"] for item in before["data"]]

    latest = await get(http, hub, f"/v1/conversations/{conversation}/messages?limit=3")
    assert latest["data"][0]["envelope"]["parts"][0]["text"] == "arrived while paging 6"


async def test_another_tenants_conversation_is_not_found(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(701, "mine"))
    conversation = (await conversation_with(http, hub, 701, 1))["id"]
    unknown = c.conversation_id(ACME, "tg", "999999")
    for path in (f"/v1/conversations/{conversation}", f"/v1/conversations/{conversation}/messages"):
        theirs = await api(http, hub, "GET", path, tenant=OTHER)
        missing = await api(http, hub, "GET", path.replace(conversation, unknown), tenant=OTHER)
        assert refused(*theirs) == refused(*missing) == (404, "not_found", "id")
    assert (await get(http, hub, "/v1/conversations", tenant=OTHER))["data"] == []


@pytest.mark.parametrize(("query", "path"), [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=-1", "limit"), ("limit=ten", "limit"),
    ("cursor=%25%25%25", "cursor"), ("cursor=" + base64.urlsafe_b64encode(b'{"a":1}').decode(), "cursor"),
    ("cursor=" + "A" * 600, "cursor"),
    ("since=yesterday", "since"), ("until=2026-01-01T00:00:00", "until"),
    ("colour=red", "colour"), ("q=a&q=b", "q"), ("q=" + "x" * 300, "q"),
])
async def test_hostile_list_queries_are_refused_naming_the_parameter(hub: Hub, http: aiohttp.ClientSession,
                                                                     query: str, path: str) -> None:
    assert refused(*await api(http, hub, "GET", f"/v1/conversations?{query}")) == (400, "invalid", path)


async def test_hostile_ids_and_message_cursors_are_refused(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(801, "one"))
    conversation = (await conversation_with(http, hub, 801, 1))["id"]
    assert refused(*await api(http, hub, "GET", "/v1/conversations/a.b*c")) == (400, "invalid", "id")
    zero = base64.urlsafe_b64encode(b"[0]").decode().rstrip("=")
    for cursor in (zero, base64.urlsafe_b64encode(b'["x"]').decode(), "!!"):
        answer = await api(http, hub, "GET", f"/v1/conversations/{conversation}/messages?cursor={cursor}")
        assert refused(*answer) == (400, "invalid", "cursor")
    assert refused(*await api(http, hub, "GET", f"/v1/conversations/{conversation}/messages?limit=500")) == (
        400, "invalid", "limit")
    naive = base64.urlsafe_b64encode(b'["2026-01-01T00:00:00","x"]').decode()  # a time without its offset
    assert refused(*await api(http, hub, "GET", f"/v1/conversations?cursor={naive}")) == (400, "invalid", "cursor")


async def test_a_redelivered_message_is_kept_once(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(851, "only once"))
    conversation = (await conversation_with(http, hub, 851, 1))["id"]
    [item] = (await get(http, hub, f"/v1/conversations/{conversation}/messages"))["data"]
    keeper = history_api(hub).keeper
    assert keeper is not None
    envelope = c.decode(msgspec.json.encode(item["envelope"]))
    assert isinstance(envelope, c.Message)
    await keeper.keep(envelope, source_seq=1, stored_at=c.now())  # what JetStream's redelivery of the same message does
    assert len((await get(http, hub, f"/v1/conversations/{conversation}/messages"))["data"]) == 1
    assert (await get(http, hub, f"/v1/conversations/{conversation}"))["message_count"] == 1
    assert len((await get(http, hub, f"/v1/contacts/{envelope.sender.id if envelope.sender else ''}"))
               ["conversations"]) == 1


async def test_a_conversation_shows_its_channels_messaging_window(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    """WhatsApp's 24-hour window runs from when the hub heard the user (the Cloud API's signed `text.json`
    webhook); the hub's clock moved past it closes it."""
    hub = await start_hub(whatsapp_config(nats_server.url, fake_api.base_url))
    document = json.loads((WHATSAPP_FIXTURES / "text.json").read_bytes())
    document["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = PHONE_NUMBER_ID  # the connection's
    body = json.dumps(document).encode()
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with http.post(f"{hub.http_url}/webhooks/whatsapp/wa", data=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": signature}) as response:
        assert response.status == 200
    conversation = c.conversation_id(ACME, "wa", "16505551234")

    async def found() -> Any:
        status, answer = await api(http, hub, "GET", f"/v1/conversations/{conversation}")
        return answer if status == 200 else None

    window = (await until(found))["window"]
    assert window["hours"] == 24 and window["open"] is True
    heard, closes = (datetime.fromisoformat(window[k]) for k in ("last_inbound", "closes_at"))
    assert closes - heard == timedelta(hours=24)
    assert abs(heard - datetime.now(UTC)) < timedelta(minutes=5)  # the hub's time, not the fixture's (2025)

    hub._started().ctx.clock = lambda: time.time() + 25 * 3600
    assert (await get(http, hub, f"/v1/conversations/{conversation}"))["window"]["open"] is False


async def test_a_message_naming_another_tenant_on_a_tenants_subject_is_parked_not_kept(
        hub: Hub, http: aiohttp.ClientSession) -> None:
    """An app of acme publishes on acme's subject an envelope that says it is other's: other's history
    never shows it; the keeper keeps it as a dead letter (stage `history`)."""
    await webhook(http, hub, private_update(861, "hello"))
    conversation = (await conversation_with(http, hub, 861, 1))["id"]
    forged = c.Message(id=c.new_id(), tenant=OTHER, conversation=c.Conversation(id=conversation), ts=c.now(),
                       direction="outbound", parts=[c.Text(text="forged-into-other")])
    await hub.nc.publish(f"{hub.subjects.prefix}.{ACME}.out.{conversation}", c.encode(forged))

    async def parked() -> list[dict[str, Any]]:
        letters = dead_letters(await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.dlq.history",
                                                     hub.subjects.stream_name("dead_letters")))
        return [letter for letter in letters if b"forged-into-other" in letter["body"]]

    [letter] = await until(parked)
    assert letter["tenant"] == ACME and letter["path"] == "$.tenant"
    assert (await get(http, hub, "/v1/conversations", tenant=OTHER))["data"] == []
    assert len((await get(http, hub, f"/v1/conversations/{conversation}/messages"))["data"]) == 1
