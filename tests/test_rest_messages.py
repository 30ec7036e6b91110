"""The REST API for apps (`POST /v1/messages`, `GET /v1/messages/{id}`) on real parts: a real
nats-server, the hub in-process, a local fake of the WhatsApp Cloud API, and WhatsApp's signed status
webhooks (`tests/fixtures/whatsapp/status_*.json`) moving the messages' histories on."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.api.messages import HISTORY_CONSUMER
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.services.history import MessageHistory
from babelhub.services.outbox import MAX_IDEMPOTENCY_KEY
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import StartHub, consumer_totals, dead_letters, stream_messages, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
ACME, OTHER = "acme", "other"
KEYS = {ACME: "acme-key", OTHER: "other-key"}
CHAT = "972987654321"
"""The recipient of WhatsApp's status fixtures: the chat the messages are sent to."""
APP_SECRET = "wa-app-secret"
_serial = itertools.count(1)


def whatsapp(connection: str, tenant: str, api_base: str) -> cfg.Connection:
    return cfg.Connection(id=connection, tenant=tenant, channel="whatsapp", api_base=f"{api_base}/whatsapp",
                          secrets={"access_token": f"{tenant}-wa-token", "app_secret": APP_SECRET},
                          options={"phone_number_id": "1122334455667"})


def config(nats_url: str, api_base: str, **hub: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(), **hub),
        tenants=[cfg.Tenant(id=tenant, api_keys=[key]) for tenant, key in KEYS.items()],
        connections=[whatsapp("wa", ACME, api_base), whatsapp("wa-other", OTHER, api_base)])


class WhatsApp:
    """The fake Cloud API's sends, each answered with a fresh `wamid` (the documented send answer)."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.native_ids: list[str] = []
        api.responder = self.answer

    def answer(self, _: Recorded) -> Reply:
        native_id = f"wamid.HBgLOTcyOTg3NjU0MzIxFQIAERgS{next(_serial):016X}"
        self.native_ids.append(native_id)
        body = json.loads((FIXTURES / "response_sent.json").read_bytes())
        body["messages"][0]["id"] = native_id
        return Reply(body=body)

    def sends(self) -> list[dict[str, Any]]:
        return [call.json() for call in self.api.requests if call.path.endswith("/messages")]


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    return await start_hub(config(nats_server.url, fake_api.base_url))


@pytest.fixture
def channel(fake_api: FakeApi) -> WhatsApp:
    return WhatsApp(fake_api)


def text(body: str = "Your order has shipped", connection: str = "wa", **fields: Any) -> dict[str, Any]:
    return {"conversation": {"connection": connection, "native_id": CHAT}, "parts": [{"type": "text", "text": body}],
            **fields}


async def post(http: aiohttp.ClientSession, hub: Hub, body: Any, *, key: str | None = KEYS[ACME],
               idempotency_key: str = "") -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(hub.http_url + "/v1/messages", data=data, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def get(http: aiohttp.ClientSession, hub: Hub, message_id: str, *, key: str | None = KEYS[ACME]
              ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.get(f"{hub.http_url}/v1/messages/{message_id}", headers=headers) as response:
        return response.status, await response.json()


async def states(http: aiohttp.ClientSession, hub: Hub, message_id: str) -> list[str]:
    status, history = await get(http, hub, message_id)
    return [step["state"] for step in history["statuses"]] if status == 200 else []


async def until_states(http: aiohttp.ClientSession, hub: Hub, message_id: str, expected: list[str]) -> None:
    for _ in range(500):
        if await states(http, hub, message_id) == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{message_id}: {await get(http, hub, message_id)} never became {expected}")


async def status_webhook(http: aiohttp.ClientSession, hub: Hub, fixture: str, native_id: str) -> None:
    """WhatsApp's signed status notification (`status_delivered.json`, `status_read.json`) for `native_id`."""
    document = json.loads((FIXTURES / fixture).read_bytes())
    document["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = native_id
    body = json.dumps(document).encode()
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with http.post(hub.http_url + "/webhooks/whatsapp/wa", data=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": signature}) as response:
        assert response.status == 200, await response.text()


async def history_caught_up(hub: Hub) -> bool:
    """Whether the history consumer has taken and acknowledged every status stored so far."""
    js = hub.nc.jetstream()
    stream = hub.subjects.stream_name("statuses")
    info = await js.consumer_info(stream, HISTORY_CONSUMER)
    last = (await js.stream_info(stream)).state.last_seq
    return info.delivered.stream_seq == last and not info.num_ack_pending and not info.num_redelivered


async def status_stored(hub: Hub, state: c.State) -> bool:
    stored = await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.status.>", hub.subjects.stream_name("statuses"))
    return any(isinstance(envelope := c.decode(data), c.Status) and envelope.state == state for data in stored)


async def receipt_applied(hub: Hub, state: c.State) -> bool:
    """Whether a channel's receipt in `state` was decoded and its conversation has applied it."""
    stored = await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.conv.>", hub.subjects.stream_name("messages"))
    decoded = any(isinstance(envelope := c.decode(data), c.Status) and envelope.state == state for data in stored)
    pending, _ = await consumer_totals(hub.nc.jetstream(), hub.subjects.stream_name("messages"), "conversations")
    return decoded and not pending


async def outbound_stored(hub: Hub) -> list[bytes]:
    return await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.out.>", hub.subjects.stream_name("messages"))


def refused(status: int, answer: dict[str, Any]) -> tuple[int, str, str]:
    assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message", "path"}, answer
    return status, answer["error"]["code"], answer["error"]["path"]


# ------------------------------------------------------------------------------------------ send


async def test_a_message_sent_over_rest_is_sent_once_and_its_history_follows_its_statuses(
        hub: Hub, channel: WhatsApp, http: aiohttp.ClientSession) -> None:
    status, accepted, _ = await post(http, hub, text())
    assert status == 202
    assert accepted == {"id": accepted["id"], "conversation": c.conversation_id(ACME, "wa", CHAT),
                        "status": "accepted", "duplicate": False}
    await until_states(http, hub, accepted["id"], ["accepted", "sent"])
    assert [(send["to"], send["text"]["body"]) for send in channel.sends()] == [(CHAT, "Your order has shipped")]
    [native_id] = channel.native_ids

    await status_webhook(http, hub, "status_delivered.json", native_id)
    await status_webhook(http, hub, "status_read.json", native_id)
    await until_states(http, hub, accepted["id"], ["accepted", "sent", "delivered", "read"])
    status, history = await get(http, hub, accepted["id"])
    assert status == 200
    assert (history["id"], history["conversation"], history["state"]) == (
        accepted["id"], accepted["conversation"], "read")
    assert [step.get("native_id", "") for step in history["statuses"]] == ["", native_id, native_id, native_id]
    assert all(datetime.fromisoformat(step["at"]).tzinfo is not None for step in history["statuses"])
    assert len(channel.sends()) == 1


async def test_a_status_that_moves_backward_is_not_recorded(
        hub: Hub, channel: WhatsApp, http: aiohttp.ClientSession) -> None:
    _, accepted, _ = await post(http, hub, text())
    await until_states(http, hub, accepted["id"], ["accepted", "sent"])
    [native_id] = channel.native_ids
    await status_webhook(http, hub, "status_read.json", native_id)
    await until_states(http, hub, accepted["id"], ["accepted", "sent", "read"])
    await status_webhook(http, hub, "status_delivered.json", native_id)  # a receipt that comes late
    await eventually_async(lambda: receipt_applied(hub, "delivered"))
    assert not await status_stored(hub, "delivered")  # the conversation does not publish it either
    await eventually_async(lambda: history_caught_up(hub))
    _, history = await get(http, hub, accepted["id"])
    assert [step["state"] for step in history["statuses"]] == ["accepted", "sent", "read"]
    assert history["state"] == "read"


async def eventually_async(check: Any, attempts: int = 500) -> None:
    for _ in range(attempts):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never true: {check}")


async def test_the_same_idempotency_key_answers_the_same_id_and_sends_once(
        hub: Hub, channel: WhatsApp, http: aiohttp.ClientSession) -> None:
    first = await post(http, hub, text("first"), idempotency_key="order-17")
    again = await post(http, hub, text("changed"), idempotency_key="order-17")
    assert (first[0], again[0]) == (202, 200)
    assert again[1] == {**first[1], "duplicate": True}

    together = await asyncio.gather(*(post(http, hub, text("together"), idempotency_key="order-18")
                                      for _ in range(6)))
    ids = {answer["id"] for _, answer, _ in together}
    assert len(ids) == 1 and ids != {first[1]["id"]}
    assert sorted(status for status, _, _ in together) == [200] * 5 + [202]

    for message_id in (first[1]["id"], *ids):
        await until_states(http, hub, message_id, ["accepted", "sent"])
    assert sorted(send["text"]["body"] for send in channel.sends()) == ["first", "together"]
    assert len(await outbound_stored(hub)) == 2


# ------------------------------------------------------------------------------------------ refusals


async def test_a_call_without_a_known_api_key_is_refused_401(hub: Hub, http: aiohttp.ClientSession) -> None:
    _, accepted, _ = await post(http, hub, text())
    for key in (None, "wrong-key", "v1.e30.c2lnbmF0dXJl"):
        status, answer, headers = await post(http, hub, text(), key=key)
        assert refused(status, answer) == (401, "unauthenticated", "")
        assert headers["WWW-Authenticate"] == "Bearer"
        status, answer = await get(http, hub, accepted["id"], key=key)
        assert refused(status, answer) == (401, "unauthenticated", "")
    assert len(await outbound_stored(hub)) == 1


async def test_another_tenant_s_message_and_connection_are_not_found(
        hub: Hub, channel: WhatsApp, http: aiohttp.ClientSession) -> None:
    _, accepted, _ = await post(http, hub, text())
    await until_states(http, hub, accepted["id"], ["accepted", "sent"])
    status, answer = await get(http, hub, accepted["id"], key=KEYS[OTHER])
    assert refused(status, answer) == (404, "not_found", "id")
    status, unknown = await get(http, hub, c.new_id())
    assert (status, unknown["error"]["code"]) == (404, "not_found")
    assert unknown["error"]["message"].startswith("no message")
    status, answer, _ = await post(http, hub, text(connection="wa"), key=KEYS[OTHER])
    assert refused(status, answer) == (404, "not_found", "$.conversation.connection")
    status, answer, _ = await post(http, hub, text(connection="wa-other"))
    assert refused(status, answer) == (404, "not_found", "$.conversation.connection")
    assert len(await outbound_stored(hub)) == 1


@pytest.mark.parametrize(("body", "key", "code", "path"), [
    (b"{not json", "", "invalid", "$"),
    (text(parts=[{"type": "text"}]), "", "invalid", "$.parts[0]"),
    (text(parts=[{"type": "text", "text": "hi"}, {"type": "location"}]), "", "invalid", "$.parts[1]"),
    (text(id="has.a.dot"), "", "invalid", "$.id"),
    (text(id="x" * 65), "", "invalid", "$.id"),
    (text(kind="status"), "", "invalid", "$.kind"),
    (text(tenant=OTHER), "", "forbidden_tenant", "$.tenant"),
    (text(), "k" * (MAX_IDEMPOTENCY_KEY + 1), "invalid_idempotency_key", ""),
])
async def test_what_cannot_be_sent_is_answered_400_with_its_path(
        hub: Hub, http: aiohttp.ClientSession, body: Any, key: str, code: str, path: str) -> None:
    status, answer, _ = await post(http, hub, body, idempotency_key=key)
    assert refused(status, answer) == (400, code, path)
    assert await outbound_stored(hub) == []


@pytest.mark.parametrize("message_id", ["has.a.dot", "x" * 65, "*", "a%20b"])
async def test_an_id_that_cannot_be_a_message_s_is_answered_400(
        hub: Hub, http: aiohttp.ClientSession, message_id: str) -> None:
    status, answer = await get(http, hub, message_id)
    assert refused(status, answer) == (400, "invalid", "id")


async def test_a_body_over_the_limit_is_answered_413(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    hub = await start_hub(config(nats_server.url, fake_api.base_url, max_body_bytes=64 * 1024))
    large = json.dumps(text("x" * 64 * 1024)).encode()
    status, answer, _ = await post(http, hub, large)
    assert refused(status, answer) == (413, "too_large", "")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for start in range(0, len(large), 4096):
            yield large[start:start + 4096]

    async with http.post(hub.http_url + "/v1/messages", data=chunks(),
                         headers={"Authorization": f"Bearer {KEYS[ACME]}"}) as response:
        assert refused(response.status, await response.json()) == (413, "too_large", "")
    assert await outbound_stored(hub) == []


async def test_a_method_the_api_does_not_take_is_answered_405(hub: Hub, http: aiohttp.ClientSession) -> None:
    async with http.put(hub.http_url + "/v1/messages", headers={"Authorization": f"Bearer {KEYS[ACME]}"}) as answer:
        assert refused(answer.status, await answer.json()) == (405, "method_not_allowed", "")
        assert answer.headers["Allow"] == "POST"


async def test_while_nats_is_down_a_send_is_answered_503_with_retry_after(
        tmp_path: Path, fake_api: FakeApi, http: aiohttp.ClientSession) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        async with Hub(config(server.url, fake_api.base_url)) as hub:
            await server.stop()
            status, answer, headers = await post(http, hub, text())
            assert refused(status, answer) == (503, "unavailable", "")
            assert int(headers["Retry-After"]) > 0
            await server.start()
    finally:
        await server.stop()


# ------------------------------------------------------------------------------------------ history


async def test_writers_meeting_on_one_history_lose_no_step(hub: Hub, nats_client: NATS) -> None:
    """The outbox's `accepted` and the consumer's statuses (in two processes) write the same keys at once:
    every step that moves forward is kept."""
    writers = [await MessageHistory.open(nats_client.jetstream(), hub.subjects) for _ in range(2)]
    conversation = c.Conversation(id=c.conversation_id(ACME, "wa", CHAT))

    def status(message_id: str, state: c.State) -> c.Status:
        return c.Status(id=c.stable_id("status", message_id, state), tenant=ACME, conversation=conversation,
                        ts=c.now(), message_id=message_id, state=state)

    created = [c.new_id() for _ in range(20)]  # both writers find no key: both create it
    await asyncio.gather(*(write for message_id in created for write in (
        writers[0].accepted(ACME, message_id, conversation.id), writers[1].record(status(message_id, "sent")))))
    updated = [c.new_id() for _ in range(20)]  # both writers read the same revision: both update it
    for message_id in updated:
        await writers[1].record(status(message_id, "sent"))
    await asyncio.gather(*(write for message_id in updated for write in (
        writers[0].accepted(ACME, message_id, conversation.id), writers[1].record(status(message_id, "delivered")))))
    for message_id, expected in [*((m, ["accepted", "sent"]) for m in created),
                                 *((m, ["accepted", "sent", "delivered"]) for m in updated)]:
        history = await writers[0].get(ACME, message_id)
        assert history is not None and [step.state for step in history.statuses] == expected
    assert await writers[0].get(OTHER, created[0]) is None


@pytest.mark.parametrize(("recorded", "then", "kept"), [
    (["sent"], "queued", False),
    (["sent"], "sent", False),
    (["sent", "read"], "delivered", False),
    (["sent"], "read", True),
    (["read"], "played", True),
    (["delivered"], "failed", True),
    (["failed"], "sent", False),
    (["failed"], "deleted", False),
])
async def test_states_only_move_forward(hub: Hub, nats_client: NATS, recorded: list[c.State], then: c.State,
                                        kept: bool) -> None:
    history = await MessageHistory.open(nats_client.jetstream(), hub.subjects)
    message_id = c.new_id()
    conversation = c.Conversation(id=c.conversation_id(ACME, "wa", CHAT))
    for state in [*recorded, then]:
        await history.record(c.Status(id=c.new_id(), tenant=ACME, conversation=conversation, ts=c.now(),
                                      message_id=message_id, state=state))
    found = await history.get(ACME, message_id)
    assert found is not None
    assert [step.state for step in found.statuses] == ([*recorded, then] if kept else recorded)


async def test_a_step_keeps_a_bounded_error_and_never_the_channel_s_raw_answer(hub: Hub, nats_client: NATS) -> None:
    history = await MessageHistory.open(nats_client.jetstream(), hub.subjects)
    message_id = c.new_id()
    error = c.Error(code="131026", message="undeliverable " * 1000, native={"page": "x" * 100_000})
    await history.record(c.Status(id=c.new_id(), tenant=ACME, conversation=c.Conversation(id="conv"), ts=c.now(),
                                  message_id=message_id, state="failed", native_id="w" * 10_000, error=error))
    found = await history.get(ACME, message_id)
    assert found is not None
    encoded = msgspec.json.encode(found)
    assert len(encoded) < 2048 and b"page" not in encoded
    assert found.statuses[0].error is not None and found.statuses[0].error.code == "131026"


async def test_a_status_on_another_tenant_s_subject_is_kept_as_a_dead_letter(
        hub: Hub, http: aiohttp.ClientSession) -> None:
    message_id = c.new_id()
    forged = c.Status(id=c.new_id(), tenant=ACME, conversation=c.Conversation(id="conv"), ts=c.now(),
                      message_id=message_id, state="read")
    await hub.nc.jetstream().publish(f"{hub.subjects.prefix}.{OTHER}.status.conv", c.encode(forged))
    letters: list[dict[str, Any]] = []

    async def parked() -> bool:
        letters[:] = dead_letters(await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.dlq.>",
                                                        hub.subjects.stream_name("dead_letters")))
        return bool(letters)

    await eventually_async(parked)
    assert [(letter["stage"], letter["path"]) for letter in letters] == [("history", "$.tenant")]
    assert (await get(http, hub, message_id))[0] == 404
