"""Failover between connections (issue 11 §5) on a real nats-server, hub and local fake channel APIs: a
WhatsApp connection whose messages are not delivered in time (or fail) has them sent again through a
Telegram connection, once, with a status trail the app can follow. Time is the hub's clock
(`HubContext.clock`), moved by the test; the scheduler looks for due timers every second of real time."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.failover import FAILOVER_OF_META, FAILOVER_TO_META, copy_id
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import BOT_TOKEN, SECRET, TENANT, Processor, StartHub, eventually, telegram_responder, unique_prefix
from tests.test_hub_statuses import fixture, meta_signed

WA_CHAT = "972987654321"
SMS_CHAT = "4242"
AFTER = 30.0
API_KEY = "failover-key"
_serial = itertools.count(1)


def failover_config(nats_url: str, api_base: str, **failover: Any) -> cfg.Config:
    """WhatsApp (`wa`) failing over to Telegram (`tg`) after `AFTER` seconds."""
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT, api_keys=[API_KEY])],
        connections=[
            cfg.Connection(id="wa", tenant=TENANT, channel="whatsapp", api_base=f"{api_base}/whatsapp",
                           secrets={"access_token": "wa-token", "app_secret": "wa-app"},
                           options={"phone_number_id": "1122334455667"},
                           failover=cfg.Failover(**{"to": "tg", "after_seconds": AFTER, **failover})),
            cfg.Connection(id="tg", tenant=TENANT, channel="telegram", api_base=f"{api_base}/telegram",
                           secrets={"bot_token": BOT_TOKEN, "secret_token": SECRET}),
        ],
    )


class Channels:
    """The fake APIs of both channels: WhatsApp answers each send with a fresh wamid (or `wa_fails`)."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.wa_fails = False
        self.wamids: list[str] = []
        api.responder = self.answer

    def answer(self, request: Recorded) -> Reply:
        if request.path.startswith("/telegram"):
            return telegram_responder(request)
        if self.wa_fails:
            return Reply(status=400, body=fixture("whatsapp", "error_131026_undeliverable.json"))
        wamid = f"wamid.HBgLOTcyOTg3NjU0MzIxFQIAERgS{next(_serial):016X}"
        self.wamids.append(wamid)
        body = fixture("whatsapp", "response_sent.json")
        body["messages"][0]["id"] = wamid
        return Reply(body=body)

    def telegram_sends(self) -> list[dict[str, Any]]:
        return [call.json() for call in self.api.requests if call.path.endswith("/sendMessage")]


def message(text: str, **meta: Any) -> c.Message:
    conversation = c.Conversation(id=c.conversation_id(TENANT, "wa", WA_CHAT), channel="whatsapp", connection="wa",
                                  native_id=WA_CHAT)
    return c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                     parts=[c.Text(text=text)], meta=meta)


async def statuses_of(app: Processor, message_id: str, count: int) -> list[c.Status]:
    found: list[c.Status] = []
    while len(found) < count:
        status = await app.next_status()
        if status.message_id == message_id:
            found.append(status)
    return found


def at(hub: Hub, moment: float) -> None:
    hub.ctx.clock = lambda: moment


async def delivered_webhook(hub: Hub, wamid: str, name: str = "status_delivered.json") -> None:
    body = fixture("whatsapp", name)
    body["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = wamid
    data = json.dumps(body).encode()
    url = f"{hub.http_url}/webhooks/whatsapp/wa"
    async with aiohttp.ClientSession() as session, session.post(url, data=data,
                                                                headers=meta_signed("wa-app")(url, data)) as response:
        assert response.status == 200, await response.text()


def assert_failed_over(status: c.Status, original: c.Message) -> None:
    """The original's trail: `failed`, code `failover`, naming the copy and where its statuses go."""
    assert status.state == "failed" and status.error is not None, status
    assert status.error.code == "failover"
    assert copy_id(original.id) in status.error.message and "'tg'" in status.error.message
    assert status.error.native["message_id"] == copy_id(original.id)
    assert status.error.native["connection"] == "tg"
    assert status.error.native["conversation"] == c.conversation_id(TENANT, "tg", SMS_CHAT)


@pytest.fixture
def channels(fake_api: FakeApi) -> Channels:
    return Channels(fake_api)


@pytest.fixture
def config(nats_server: EmbeddedServer, fake_api: FakeApi) -> cfg.Config:
    return failover_config(nats_server.url, fake_api.base_url)


async def test_a_message_not_delivered_in_time_is_sent_once_via_the_failover_connection(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    original = message("Your code is 1234", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    [sent] = await statuses_of(app, original.id, 1)
    assert sent.state == "sent" and sent.native_id == channels.wamids[0]
    assert channels.telegram_sends() == []

    at(hub, now + AFTER + 1)
    [failed] = await statuses_of(app, original.id, 1)
    assert_failed_over(failed, original)
    [copy_sent] = await statuses_of(app, copy_id(original.id), 1)
    assert copy_sent.state == "sent" and copy_sent.conversation.connection == "tg"
    sends = channels.telegram_sends()
    assert [(s["chat_id"], s["text"]) for s in sends] == [(int(SMS_CHAT), "Your code is 1234")]

    scheduler = hub.ctx.scheduler
    assert scheduler is not None
    at(hub, now + 10 * AFTER)
    assert await scheduler.release_due() == 0
    later = message("later")  # taken up after anything the timer could still have caused on this chat
    await app.send(later)
    await statuses_of(app, later.id, 1)
    assert len(channels.telegram_sends()) == 1


async def test_the_copy_names_the_original_in_meta(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    copies: list[c.Envelope] = []

    async def on_copy(msg: Any) -> None:
        copies.append(c.decode(msg.data))

    tg_conversation = c.conversation_id(TENANT, "tg", WA_CHAT)
    await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.out.{tg_conversation}", cb=on_copy)
    now = time.time()
    at(hub, now)
    original = message("same chat id")  # no failover_to: the same native id on the other connection
    await app.send(original)
    await statuses_of(app, original.id, 1)
    at(hub, now + AFTER + 1)
    await statuses_of(app, original.id, 1)
    await eventually(lambda: len(copies) == 1)
    copy = copies[0]
    assert isinstance(copy, c.Message)
    assert copy.id == copy_id(original.id) and copy.meta[FAILOVER_OF_META] == original.id
    assert copy.conversation.native_id == WA_CHAT


async def test_a_message_delivered_in_time_is_not_sent_again(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    original = message("delivered", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    await statuses_of(app, original.id, 1)
    await delivered_webhook(hub, channels.wamids[0])
    [delivered] = await statuses_of(app, original.id, 1)
    assert delivered.state == "delivered"

    at(hub, now + AFTER + 1)
    scheduler = hub.ctx.scheduler
    assert scheduler is not None
    assert await scheduler.release_due() == 0
    later = message("later")
    await app.send(later)
    await statuses_of(app, later.id, 1)
    assert channels.telegram_sends() == []


async def history(hub: Hub, message_id: str) -> list[dict[str, Any]]:
    """The message's steps as `GET /v1/messages/{id}` answers them ([] until it has a history)."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{hub.http_url}/v1/messages/{message_id}", headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        if response.status == 404:
            return []
        assert response.status == 200, await response.text()
        steps: list[dict[str, Any]] = (await response.json())["statuses"]
        return steps


async def test_the_status_history_links_the_original_to_its_copy(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    original = message("tracked", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    await statuses_of(app, original.id, 1)
    at(hub, now + AFTER + 1)
    await statuses_of(app, copy_id(original.id), 1)

    steps = await history_becomes(hub, original.id, ["sent", "failed"])
    error = steps[-1]["error"]
    assert error["code"] == "failover" and copy_id(original.id) in error["message"]
    await history_becomes(hub, copy_id(original.id), ["sent"])


async def history_becomes(hub: Hub, message_id: str, states: list[str]) -> list[dict[str, Any]]:
    """The message's history once its states are `states` (the histories are recorded asynchronously)."""
    deadline = time.monotonic() + 15
    while True:
        steps = await history(hub, message_id)
        if [step["state"] for step in steps] == states:
            return steps
        assert time.monotonic() < deadline, steps
        await asyncio.sleep(0.1)


async def test_a_delivery_that_beats_a_timer_already_released_still_wins(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    """The release checks how far the message got, whatever became of the timer (a race with the drop)."""
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    scheduler = hub.ctx.scheduler
    assert scheduler is not None
    now = time.time()
    at(hub, now)
    original = message("delivered", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    await statuses_of(app, original.id, 1)
    timer = await scheduler.take(TENANT, c.stable_id("failover-timer", original.id))
    assert timer is not None
    await delivered_webhook(hub, channels.wamids[0])
    await statuses_of(app, original.id, 1)
    await scheduler.hold(c.stable_id("failover-timer", original.id), msgspec.structs.replace(timer, due=now))
    assert await scheduler.release_due() == 1
    later = message("later")
    await app.send(later)
    await statuses_of(app, later.id, 1)
    assert channels.telegram_sends() == []


async def test_a_send_that_fails_outright_fails_over_at_once(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    channels.wa_fails = True
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    at(hub, time.time())  # the clock stands still: nothing waits for a deadline
    original = message("fails", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    [failed] = await statuses_of(app, original.id, 1)
    assert_failed_over(failed, original)
    assert failed.error is not None and failed.error.native["cause"]["code"] != "failover"
    [copy_sent] = await statuses_of(app, copy_id(original.id), 1)
    assert copy_sent.state == "sent"
    assert [s["text"] for s in channels.telegram_sends()] == ["fails"]


async def test_a_failed_status_from_the_channel_fails_over_at_once(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    at(hub, time.time())  # the clock stands still: the channel's failure, not the deadline, fails it over
    original = message("undeliverable", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    await statuses_of(app, original.id, 1)
    await delivered_webhook(hub, channels.wamids[0], "status_failed.json")
    [failed] = await statuses_of(app, original.id, 1)
    assert_failed_over(failed, original)
    assert failed.error is not None and failed.error.native["cause"]["code"] != "failover"
    [copy_sent] = await statuses_of(app, copy_id(original.id), 1)
    assert copy_sent.state == "sent"
    assert [s["text"] for s in channels.telegram_sends()] == ["undeliverable"]


async def test_failover_happens_once_after_a_hub_restart(
        config: cfg.Config, channels: Channels, nats_client: NATS, start_hub: StartHub) -> None:
    first = await start_hub(config)
    app = await Processor(nats_client, first.subjects.prefix).start()
    now = time.time()
    at(first, now)
    original = message("across a restart", **{FAILOVER_TO_META: SMS_CHAT})
    await app.send(original)
    assert [s.state for s in await statuses_of(app, original.id, 1)] == ["sent"]
    await first.stop()

    second = await start_hub(config)
    at(second, now + AFTER + 1)
    [failed] = await statuses_of(app, original.id, 1)
    assert_failed_over(failed, original)
    await statuses_of(app, copy_id(original.id), 1)
    assert len(channels.telegram_sends()) == 1
    assert len(channels.wamids) == 1


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(("failover", "expected"), [
    ({"to": "nowhere", "after_seconds": 5}, "$.connections[0].failover.to: no other connection 'nowhere'"),
    ({"to": "a", "after_seconds": 5}, "$.connections[0].failover.to: no other connection 'a'"),
    ({"to": "other", "after_seconds": 5}, "$.connections[0].failover.to: no other connection 'other'"),
    ({"to": "b", "after_seconds": 0}, "$.connections[0].failover.after_seconds"),
])
def test_a_failover_names_another_connection_of_the_tenant(failover: dict[str, Any], expected: str,
                                                             tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=_literal(expected)):
        _load(tmp_path, failover, {})


def test_failover_cycles_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=_literal("failover goes round in a cycle: a -> b -> a")):
        _load(tmp_path, {"to": "b", "after_seconds": 5}, {"to": "a", "after_seconds": 5})


def _literal(text: str) -> str:
    return re.escape(text)


def _load(tmp_path: Any, a_failover: dict[str, Any], b_failover: dict[str, Any]) -> cfg.Config:
    def table(failover: dict[str, Any]) -> str:
        if not failover:
            return ""
        return f'failover = {{ to = "{failover["to"]}", after_seconds = {failover["after_seconds"]} }}\n'

    path = tmp_path / "babelhub.toml"
    path.write_text(
        '[[tenants]]\nid = "acme"\n[[tenants]]\nid = "zeta"\n'
        '[[connections]]\nid = "a"\ntenant = "acme"\nchannel = "webchat"\n' + table(a_failover)
        + '[[connections]]\nid = "b"\ntenant = "acme"\nchannel = "webchat"\n' + table(b_failover)
        + '[[connections]]\nid = "other"\ntenant = "zeta"\nchannel = "webchat"\n')
    return cfg.load(path, env={})
