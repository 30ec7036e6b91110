"""One bad conversation never stalls the others (issue 7 §3): poison ids, actors that cannot load, a chat
whose channel API hangs, an activation that cannot save, a background task that crashes. Real parts: a
real nats-server, the hub in-process (or `babelhub run`), a local fake of the Telegram Bot API."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.actors.conversation import MAX_SNAPSHOT_BYTES, ConversationActor, ConversationState, Inbound, actor_key
from babelhub.actors.memory import Fact
from babelhub.codecs.base import REPLY_API_BASE
from babelhub.hub.app import Hub
from babelhub.services import kvscan
from babelhub.services.broker import EmbeddedServer, free_port, provision
from tests.fakeapi import FakeApi, Reply
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    Processor,
    StartHub,
    consumer_totals,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
    unique_prefix,
    with_hub,
    write_config,
)

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}


class HangingApi(FakeApi):
    """The Bot API, except that calls for which `hangs(request)` is true get no answer until `release`."""

    def __init__(self) -> None:
        super().__init__(telegram_responder)
        self.release = asyncio.Event()
        self.hanging = 0
        self.hangs: Callable[[str, dict[str, Any]], bool] = lambda path, body: False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not self.release.is_set() and self.hangs(request.path, json.loads(body) if body else {}):
            self.hanging += 1
            await self.release.wait()
            self.hanging -= 1
        return await super()._handle(request)




@pytest.fixture
async def hanging_api() -> AsyncIterator[HangingApi]:
    api = HangingApi()
    await api.start()
    yield api
    api.release.set()
    await api.stop()


async def post(hub_url: str, update: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            f"{hub_url}/webhooks/telegram/tg", json=update, headers=HEADERS) as response:
        assert response.status == 200


def outbound(conversation_id: str, text: str, tenant: str = TENANT) -> c.Message:
    return c.Message(id=c.new_id(), tenant=tenant, conversation=c.Conversation(id=conversation_id), ts=c.now(),
                     direction="outbound", parts=[c.Text(text=text)])


async def publish_raw(nc: NATS, subject: str, message: c.Message) -> None:
    await nc.publish(subject, c.encode(message))
    await nc.flush()


async def letters_in(nc: NATS, prefix: str, expected: int) -> list[dict[str, Any]]:
    """The dead letters of `prefix`, once at least `expected` of them are there (bounded wait)."""
    found: list[dict[str, Any]] = []
    for _ in range(200):
        found = dead_letters(await stream_messages(nc, f"{prefix}.*.dlq.>", f"{prefix.upper()}_DEAD_LETTERS"))
        if len(found) >= expected:
            break
        await asyncio.sleep(0.05)
    return found


async def corrupt_snapshots(nc: NATS, prefix: str) -> list[str]:
    """Overwrite every conversation snapshot of `prefix` with bytes no snapshot decoder accepts: the
    next activation of those conversations fails, every time."""
    kv = await nc.jetstream().key_value(f"{prefix}_conversations")
    keys = await kvscan.keys(kv)
    for key in keys:
        await kv.put(key, b"\xc1 not a snapshot")
    return keys


def sent_texts(api: FakeApi, chat: int) -> list[str]:
    return [request.json()["text"] for request in api.requests
            if request.path.endswith("/sendMessage") and str(request.json()["chat_id"]) == str(chat)]


# ------------------------------------------------------------------------------------------- poison ids

async def test_poison_ids_are_dead_lettered_and_other_conversations_flow(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(with_hub(telegram_config(nats_server.url, fake_api.base_url), idle_seconds=0.2))
    prefix = hub.subjects.prefix
    app = await Processor(nats_client, prefix).start()

    # Chat 666 gets a snapshot, passivates, and then its snapshot is made unreadable.
    await post(hub.http_url, telegram_update(1, 666, "hello"))
    poisoned, _ = await app.next()
    await eventually(lambda: hub.conversations.active == 0)
    assert await corrupt_snapshots(nats_client, prefix)

    bad_token = "bad%id"  # a token no KV key may hold
    await publish_raw(nats_client, f"{prefix}.{TENANT}.out.{bad_token}", outbound(bad_token, "poison 1"))
    await publish_raw(nats_client, f"{prefix}.{TENANT}.out.{poisoned.conversation.id}",
                      outbound(poisoned.conversation.id, "poison 2"))
    await publish_raw(nats_client, f"{prefix}.nobody.out.{poisoned.conversation.id}",
                      outbound(poisoned.conversation.id, "poison 3", tenant="nobody"))

    # Other conversations are not held up by any of it.
    await post(hub.http_url, telegram_update(2, 42, "hi"))
    inbound, _ = await app.next()
    reply = await app.reply(inbound, c.Text(text="still served"))
    status = await app.next_status()
    assert status.message_id == reply.id and status.state == "sent"
    assert sent_texts(fake_api, 42) == ["still served"]
    assert sent_texts(fake_api, 666) == []

    letters = await letters_in(nats_client, prefix, 3)
    by_text = {json.loads(letter["body"])["parts"][0]["text"]: letter for letter in letters}
    assert set(by_text) == {"poison 1", "poison 2", "poison 3"}
    assert by_text["poison 1"]["stage"] == "processor" and "not a conversation id" in by_text["poison 1"]["error"]
    assert by_text["poison 2"]["stage"] == "send" and "could not be activated" in by_text["poison 2"]["error"]
    assert by_text["poison 3"]["stage"] == "processor" and "not a configured tenant" in by_text["poison 3"]["error"]
    js = nats_client.jetstream()
    await eventually_async(lambda: _settled(js, hub))


async def _settled(js: Any, hub: Hub) -> bool:
    pending, _ = await consumer_totals(js, hub.subjects.stream_name("messages"), "conversations")
    return pending == 0 and len(hub.inflight) == 0


async def eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def test_sigterm_and_restart_do_not_wedge_on_a_poison(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, tmp_path: Path,
        hub_processes: list[HubProcess]) -> None:
    fake_api.responder = telegram_responder
    port, prefix = free_port(), unique_prefix()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_server.url}"
subject_prefix = "{prefix}"
idle_seconds = 0.2
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "{fake_api.base_url}"
max_rate = 0
secrets = {{ bot_token = "{BOT_TOKEN}", secret_token = "{SECRET}" }}
""")
    url = f"http://127.0.0.1:{port}"
    app = await Processor(nats_client, prefix).start()
    first = HubProcess(config, tmp_path)
    hub_processes.append(first)
    first.start()
    await first.wait_ready(url)

    await post(url, telegram_update(1, 666, "hello"))
    poisoned, _ = await app.next()
    await eventually_async(lambda: _metric_is(url, 'babelhub_active_actors{actors="conversation"} 0.0'))
    assert await corrupt_snapshots(nats_client, prefix)
    await publish_raw(nats_client, f"{prefix}.{TENANT}.out.bad%id", outbound("bad%id", "poison 1"))
    await publish_raw(nats_client, f"{prefix}.{TENANT}.out.{poisoned.conversation.id}",
                      outbound(poisoned.conversation.id, "poison 2"))
    await post(url, telegram_update(2, 42, "hi"))
    inbound, _ = await app.next()
    await app.reply(inbound, c.Text(text="before the restart"))
    assert (await app.next_status()).state == "sent"

    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    output, _ = await asyncio.to_thread(first.process.communicate, None, 60)  # a generous bound on the wait
    assert first.process.returncode == 0, output.decode(errors="replace")

    again = HubProcess(config, tmp_path)
    hub_processes.append(again)
    again.start()
    await again.wait_ready(url)
    await app.reply(inbound, c.Text(text="after the restart"))
    assert (await app.next_status()).state == "sent"
    assert sent_texts(fake_api, 42) == ["before the restart", "after the restart"]
    assert sent_texts(fake_api, 666) == []
    stages = sorted(letter["stage"] for letter in await letters_in(nats_client, prefix, 2))
    assert stages == ["processor", "send"]


async def _metric_is(url: str, line: str) -> bool:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        return line in await response.text()


# ------------------------------------------------------------------------------------------- slow chat

async def test_a_chat_whose_api_hangs_delays_only_itself(nats_server: EmbeddedServer, nats_client: NATS,
                                                         hanging_api: HangingApi, start_hub: StartHub) -> None:
    stuck, others = 42, [43, 44, 45, 46]
    hanging_api.hangs = lambda path, body: path.endswith("/sendMessage") and str(body.get("chat_id")) == str(stuck)
    config = telegram_config(nats_server.url, hanging_api.base_url)
    config = msgspec.structs.replace(with_hub(config, mailbox_size=2),
                                     connections=[msgspec.structs.replace(config.connections[0], max_rate=0)])
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    inbound: dict[int, c.Envelope] = {}
    for update_id, chat in enumerate([stuck, *others], start=1):
        await post(hub.http_url, telegram_update(update_id, chat, "hi"))
        envelope, _ = await app.next()
        inbound[int(envelope.conversation.native_id)] = envelope

    # The stuck chat: one reply hangs in its turn, two fill its mailbox, the rest find it full.
    for n in range(6):
        await app.reply(inbound[stuck], c.Text(text=f"stuck {n}"))
    await eventually(lambda: hanging_api.hanging == 1)
    for chat in others:
        for n in range(2):
            await app.reply(inbound[chat], c.Text(text=f"{chat} {n}"))
    await post(hub.http_url, telegram_update(100, stuck, "more from the stuck chat"))
    await post(hub.http_url, telegram_update(101, others[0], "more from another chat"))

    # Everyone else is served while the stuck chat still waits for its channel.
    for chat in others:
        await eventually(lambda chat=chat: sent_texts(hanging_api, chat) == [f"{chat} {n}" for n in range(2)])
    later, _ = await app.next()
    assert isinstance(later, c.Message) and later.parts == [c.Text(text="more from another chat")]
    assert hanging_api.hanging == 1 and sent_texts(hanging_api, stuck) == []

    # Then the stuck chat recovers, everything in its order.
    hanging_api.release.set()
    await eventually(lambda: sent_texts(hanging_api, stuck) == [f"stuck {n}" for n in range(6)], timeout=60)
    later, _ = await app.next(timeout=60)
    assert isinstance(later, c.Message) and later.parts == [c.Text(text="more from the stuck chat")]
    await eventually_async(lambda: _settled(nats_client.jetstream(), hub), timeout=30)


async def test_a_burst_on_one_connection_is_decoded_without_turning_records_away(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """One connection actor decodes for all of a connection's chats: a burst far larger than a mailbox
    must not send raw records back to the server (a nak per record, then per redelivery, collapsed the
    throughput of a busy connection); only a full *conversation* turns messages away."""
    fake_api.responder = telegram_responder
    hub = await start_hub(with_hub(telegram_config(nats_server.url, fake_api.base_url), mailbox_size=2))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    chats = range(1000, 1060)
    async with aiohttp.ClientSession() as session:
        async def deliver(update_id: int, chat: int) -> None:
            async with session.post(f"{hub.http_url}/webhooks/telegram/tg", json=telegram_update(update_id, chat, "hi"),
                                    headers=HEADERS) as response:
                assert response.status == 200

        await asyncio.gather(*(deliver(n, chat) for n, chat in enumerate(chats, start=1)))
    seen = {int((await app.next())[0].conversation.native_id) for _ in chats}
    assert seen == set(chats)
    _, redelivered = await consumer_totals(nats_client.jetstream(), hub.subjects.stream_name("raw"), "raw")
    assert redelivered == 0


# ------------------------------------------------------------------------- an activation that cannot save

async def test_an_activation_that_cannot_save_hands_its_mail_back(nats_server: EmbeddedServer, nats_client: NATS,
                                                                  fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(telegram_config(nats_server.url, fake_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await post(hub.http_url, telegram_update(1, 42, "hi"))
    inbound, _ = await app.next()
    kv = await nats_client.jetstream().key_value(hub.subjects.bucket("conversations"))
    await eventually_async(lambda: _has_keys(kv))
    key = actor_key(TENANT, inbound.conversation.id)  # the snapshot (facts have keys of their own)
    entry = await kv.get(key)
    await kv.put(key, entry.value or b"")  # another writer: the active actor's next save is refused

    reply = await app.reply(inbound, c.Text(text="after a conflict"))
    statuses = [await app.next_status()]
    assert statuses[0].message_id == reply.id
    # The held reply was handed back (not kept alive for ever), redelivered, and applied by a new activation.
    await eventually_async(lambda: _settled(nats_client.jetstream(), hub), timeout=30)
    assert hub.conversations.active == 1 and "after a conflict" in sent_texts(fake_api, 42)


async def _has_keys(kv: Any) -> bool:
    return bool(await kvscan.keys(kv))  # kvscan: [] for an empty bucket, where KeyValue.keys() raises


# ------------------------------------------------------------------------------------ supervised tasks

async def readiness(hub: Hub) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(hub.http_url + "/readyz") as response:
        return response.status, await response.json()


async def test_a_crashed_poller_is_restarted_and_readiness_names_it(
        nats_server: EmbeddedServer, nats_client: NATS, hanging_api: HangingApi, start_hub: StartHub) -> None:
    updates = [telegram_update(500, 42, "polled")]

    def responder(request):  # type: ignore[no-untyped-def]
        if request.path.endswith("/getUpdates"):
            offset = request.json().get("offset", 0)
            return Reply(body={"ok": True, "result": [u for u in updates if u["update_id"] >= offset]})
        return telegram_responder(request)

    hanging_api.responder = responder
    hanging_api.hangs = lambda path, body: path.endswith("/getUpdates")
    hub = await start_hub(telegram_config(nats_server.url, hanging_api.base_url, mode="polling"))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await eventually(lambda: hanging_api.hanging == 1)
    js = nats_client.jetstream()
    await js.delete_key_value(hub.subjects.bucket("cursors"))  # the poller's store goes away under it
    hanging_api.release.set()

    observed: list[dict[str, Any]] = []

    async def poller_failing() -> bool:
        status, body = await readiness(hub)
        observed.append(body)
        return status == 503 and str(body["tasks"].get("poller:tg", "")).startswith("failing")

    await eventually_async(poller_failing)
    assert observed[-1]["ready"] is False and observed[-1]["tasks"]["inflight-keepalive"] == "running"
    await provision(js, hub.subjects, 600)  # the store is back: the restarted poller goes on

    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.parts == [c.Text(text="polled")]

    async def ready_again() -> bool:
        status, body = await readiness(hub)
        return status == 200 and body["tasks"]["poller:tg"] == "running"

    await eventually_async(ready_again, timeout=60)


# ------------------------------------------------------------------------------------------ state bounds

async def test_conversation_state_stays_bounded_under_hostile_envelopes(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, fake_api.base_url))
    key = c.conversation_id(TENANT, "tg", "42")
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)  # the hub's own actor, on the hub's real streams and KV
    await actor.on_activate()
    chat = c.Conversation(id=key, channel="telegram", connection="tg", native_id="42")

    def hostile(n: int, id_length: int = 128) -> c.Message:
        return c.Message(
            id=f"{n:0{id_length}d}", tenant=TENANT, conversation=chat, ts=c.now(), direction="inbound",
            sender=c.Sender(id=c.sender_id(TENANT, "tg", str(n)), name=f"{n}" + "Ω" * 2000, role="user"),
            native=c.Native(id=f"{n:0{id_length}d}", thread="t" * 10_000), thread="x" * 10_000,
            parts=[c.Text(text="hi")], meta={REPLY_API_BASE: "https://example.org/" + "a" * 10_000})

    for n in range(10_000):  # 10k participants with huge names, ids at the length limit
        await actor.receive(Inbound(hostile(n)))
    for n in range(10_000, 10_050):  # ids far beyond any channel's
        await actor.receive(Inbound(hostile(n, id_length=5000)))
    last = c.Message(id="last", tenant=TENANT, conversation=chat, ts=c.now(), direction="inbound",
                     native=c.Native(id="42:7"), sender=c.Sender(id="s", name="Ada"), parts=[c.Text(text="hi")])
    await actor.receive(Inbound(last))
    await actor.checkpoint()

    entry = await hub.ctx.snapshots.get(actor_key(TENANT, key))
    assert entry.value is not None and len(entry.value) <= MAX_SNAPSHOT_BYTES
    state = msgspec.msgpack.decode(entry.value, type=ConversationState)
    assert len(state.participants) <= 256 and state.participants["s"] == "Ada"
    assert all(len(name.encode()) <= 128 for name in state.participants.values())
    assert state.api_base == "" and state.conversation == chat
    assert await actor.memory.get(Fact.MESSAGE, "last") == "42:7"  # the newest ids stay resolvable

    # A redelivery of an envelope with a long id is still recognised and skipped.
    inbound: list[bytes] = []

    async def seen(msg: Msg) -> None:
        inbound.append(msg.data)

    subscription = await nats_client.subscribe(hub.subjects.inbound(TENANT, key), cb=seen)
    await actor.receive(Inbound(hostile(10_049, id_length=5000)))
    await nats_client.flush()
    await subscription.unsubscribe()
    assert inbound == []


async def test_stopping_does_not_wait_for_a_chat_whose_api_never_answers(
        nats_server: EmbeddedServer, nats_client: NATS, hanging_api: HangingApi, start_hub: StartHub) -> None:
    hanging_api.hangs = lambda path, body: path.endswith("/sendMessage")
    config = telegram_config(nats_server.url, hanging_api.base_url)
    hub = Hub(config)
    await hub.__aenter__()
    try:
        app = await Processor(nats_client, hub.subjects.prefix).start()
        await post(hub.http_url, telegram_update(1, 42, "hi"))
        inbound, _ = await app.next()
        reply = await app.reply(inbound, c.Text(text="never answered"))
        await eventually(lambda: hanging_api.hanging == 1)
    finally:
        # Without a grace period this waits for the send's 5 attempts of 30 s each.
        await asyncio.wait_for(hub.stop(), 60)

    # The reply was handed back, not acknowledged: the next hub process takes it up without waiting
    # ack_wait. Its call had reached the channel and was never answered, so the send ledger has it in
    # flight: it is reconciled (Telegram offers no lookup), not sent a second time.
    hanging_api.release.set()
    await start_hub(config)
    status = await app.next_status()
    assert status.message_id == reply.id and status.state == "failed"
    assert status.error is not None and status.error.code == "ambiguous"
    assert len([r for r in hanging_api.requests if r.path.endswith("/sendMessage")]) == 1
