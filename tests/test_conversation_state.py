"""Conversation state whose cost per message does not grow: a fixed-size snapshot, and one expiring KV
key per learnt fact (issue 8 item 5). Real nats-server, the hub's own streams and bucket, a fake Telegram
Bot API; conversations are driven through their actor directly where thousands of messages are needed."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from babelhub import canonical as c
from babelhub.actors import conversation
from babelhub.actors.conversation import (
    MAX_SNAPSHOT_BYTES,
    ConversationActor,
    ConversationState,
    Inbound,
    Outbound,
    actor_key,
)
from babelhub.actors.memory import Fact, Memory
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, Subjects, free_port, provision
from babelhub.services.publisher import Publisher, header_block_size
from tests.fakeapi import FakeApi
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    Processor,
    StartHub,
    telegram_config,
    telegram_responder,
    telegram_update,
    unique_prefix,
    write_config,
)

CHAT = "42"
PAIRS = 1_100
"""Inbound messages, each answered: more than the thousand ids and two thousand applied envelopes that
snapshots used to hold, so the first messages are ones the old snapshot had already forgotten."""


def unpaced(config: cfg.Config) -> cfg.Config:
    """The fake API has no limit: no pause between sends (Telegram's is 30 a second)."""
    return msgspec.structs.replace(config, connections=[
        msgspec.structs.replace(connection, max_rate=0) for connection in config.connections])


def chat_of(key: str) -> c.Conversation:
    return c.Conversation(id=key, channel="telegram", connection="tg", native_id=CHAT)


def user_message(key: str, n: int, *parts: c.Part) -> c.Message:
    native_id = f"{CHAT}:{n}"
    return c.Message(id=c.message_id(TENANT, "tg", native_id), tenant=TENANT, conversation=chat_of(key),
                     ts=c.now(), direction="inbound", native=c.Native(id=native_id, seq=n),
                     sender=c.Sender(id="ada", name="Ada", role="user"), parts=list(parts or [c.Text(text=f"hi {n}")]))


def app_reply(key: str, n: int, reply_to: str = "") -> c.Message:
    return c.Message(id=f"app-reply-{n}", tenant=TENANT, conversation=c.Conversation(id=key), ts=c.now(),
                     direction="outbound", parts=[c.Text(text=f"answer {n}")], reply_to=reply_to)


class Recorder:
    """What a subject carries, seen on the wire by a core-NATS subscriber: envelopes, or bytes written."""

    def __init__(self) -> None:
        self.envelopes: list[c.Envelope] = []
        self.bytes = 0
        self.count = 0

    async def envelope(self, msg: Msg) -> None:
        self.envelopes.append(c.decode(msg.data))

    async def write(self, msg: Msg) -> None:
        self.bytes += len(msg.data) + header_block_size(msg.headers)
        self.count += 1


async def converse(actor: ConversationActor, key: str, first: int, last: int, checkpoint_every: int = 8,
                   seqs: bool = False) -> None:
    """Messages `first`..`last` from the user, each answered by the app, checkpointed as the runtime does;
    `seqs`: the answers come from the stream, with their sequences (else as if from the stream's catch-up)."""
    for n in range(first, last + 1):
        inbound = user_message(key, n)
        await actor.receive(Inbound(inbound))
        await actor.receive(Outbound(app_reply(key, n, reply_to=inbound.id), seq=n if seqs else 0))
        if n % checkpoint_every == 0:
            await actor.checkpoint()
    await actor.checkpoint()


async def long_conversation(hub: Hub, nc: NATS) -> tuple[str, Recorder, Recorder]:
    """A conversation of `PAIRS` answered messages; the recorders see its `in.` and `status.` subjects."""
    key = c.conversation_id(TENANT, "tg", CHAT)
    inbound, statuses = Recorder(), Recorder()
    await nc.subscribe(hub.subjects.inbound(TENANT, key), cb=inbound.envelope)
    await nc.subscribe(hub.subjects.status(TENANT, key), cb=statuses.envelope)
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()
    await converse(actor, key, 1, PAIRS)
    return key, inbound, statuses


def sends(api: FakeApi) -> list[dict[str, Any]]:
    return [request.json() for request in api.requests if request.path.endswith("/sendMessage")]


async def checkpoint_bytes(hub: Hub, nc: NATS, actor: ConversationActor, key: str, n: int) -> int:
    """Bytes written to the conversations bucket by one more answered message and its checkpoint."""
    recorder = Recorder()
    subscription = await nc.subscribe(f"$KV.{hub.subjects.bucket('conversations')}.>", cb=recorder.write)
    await nc.flush()
    await converse(actor, key, n, n, checkpoint_every=1_000_000)
    await nc.flush()
    await asyncio.sleep(0.1)
    await subscription.unsubscribe()
    return recorder.bytes


async def snapshot_bytes(hub: Hub, actor: ConversationActor, key: str) -> int:
    """The size of the actor's snapshot, written now (a checkpoint writes it only when it changed)."""
    await actor.save_snapshot()
    return len((await hub.ctx.snapshots.get(actor_key(TENANT, key))).value or b"")


# ------------------------------------------------------------------------------------ bounded cost

async def test_a_checkpoint_writes_the_same_bytes_however_long_the_conversation(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()

    await converse(actor, key, 1, 20)
    young_snapshot = await snapshot_bytes(hub, actor, key)
    young_write = await checkpoint_bytes(hub, nats_client, actor, key, 21)
    await converse(actor, key, 22, PAIRS)
    old_snapshot = await snapshot_bytes(hub, actor, key)
    old_write = await checkpoint_bytes(hub, nats_client, actor, key, PAIRS + 1)

    assert old_snapshot <= young_snapshot * 1.1 and old_snapshot < 1024  # nothing that grows per message
    assert young_write > 0 and old_write <= young_write * 1.1
    assert old_write < 2048  # one answered message: its snapshot and a few small keys


async def test_a_snapshot_stays_within_its_bound_under_hostile_envelopes(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()
    for n in range(300):  # more than a snapshot's journal takes, in one checkpoint; ids at the length limit
        envelope = msgspec.structs.replace(
            user_message(key, n), id=f"{n:0128d}", native=c.Native(id=f"{n:0128d}", thread=f"{n:0128d}"),
            thread=f"t{n:0127d}", sender=c.Sender(id=f"{n:0128d}", name="Ω" * 2000, role="user"))
        await actor.receive(Inbound(envelope))
    await actor.checkpoint()

    entry = await hub.ctx.snapshots.get(actor_key(TENANT, key))
    assert entry.value is not None and len(entry.value) <= MAX_SNAPSHOT_BYTES
    assert msgspec.msgpack.decode(entry.value, type=ConversationState).journal == []  # written before it
    fresh = Memory(hub.ctx.snapshots, hub.subjects.bucket("conversations"), hub.publisher, actor_key(TENANT, key))
    assert await fresh.get(Fact.MESSAGE, f"{299:0128d}") == f"{299:0128d}"
    assert await fresh.get(Fact.THREAD, f"t{299:0127d}") == f"{299:0128d}"


async def test_a_conversation_in_full_flow_reads_only_what_may_repeat(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    reads = Recorder()
    await nats_client.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{hub.subjects.bucket('conversations')}",
                                cb=reads.write)
    await nats_client.flush()
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()
    await converse(actor, key, 1, 50, seqs=True)
    await nats_client.flush()
    flowing = reads.count

    inbound = Recorder()
    await nats_client.subscribe(hub.subjects.inbound(TENANT, key), cb=inbound.envelope)
    await nats_client.flush()
    again = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await again.on_activate()
    retried = msgspec.structs.replace(user_message(key, 3), ts=user_message(key, 3).ts - timedelta(minutes=20),
                                      native=c.Native(id=f"{CHAT}:3", seq=10_000))  # a new record, an old message
    await again.receive(Inbound(retried))
    await again.receive(Inbound(user_message(key, 5)))  # redelivered: its record is not newer
    await nats_client.flush()
    await asyncio.sleep(0.1)

    assert flowing == 2  # the snapshot and the send ledger at activation; nothing per message
    assert inbound.envelopes == []


async def test_a_turn_that_only_moves_its_progress_marks_leaves_the_snapshot_to_lag(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    snapshot_writes = Recorder()
    await nats_client.subscribe(f"$KV.{hub.subjects.bucket('conversations')}.{actor_key(TENANT, key)}",
                                cb=snapshot_writes.write)
    await nats_client.flush()
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()

    await converse(actor, key, 1, 1, seqs=True)  # the chat, its participant: written
    await converse(actor, key, 2, 10, checkpoint_every=1, seqs=True)  # only the marks move: not written
    await nats_client.flush()
    await asyncio.sleep(0.1)
    assert snapshot_writes.count == 1

    monkeypatch.setattr(conversation, "SNAPSHOT_LAG_SECONDS", 0.0)  # the marks are now old enough
    await converse(actor, key, 11, 11, seqs=True)
    await nats_client.flush()
    await asyncio.sleep(0.1)
    saved = msgspec.msgpack.decode((await hub.ctx.snapshots.get(actor_key(TENANT, key))).value or b"",
                                   type=ConversationState)
    assert snapshot_writes.count == 2 and saved.out_seq == 11 and saved.in_seq == 11

    monkeypatch.setattr(conversation, "SNAPSHOT_LAG_SECONDS", 3600.0)
    await converse(actor, key, 12, 12, seqs=True)
    await actor.on_passivate()  # the last marks are written when the activation ends
    saved = msgspec.msgpack.decode((await hub.ctx.snapshots.get(actor_key(TENANT, key))).value or b"",
                                   type=ConversationState)
    assert saved.out_seq == 12 and saved.in_seq == 12


async def test_after_a_crash_with_a_lagging_snapshot_redelivered_messages_are_not_applied_again(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()
    await converse(actor, key, 1, 6, checkpoint_every=1, seqs=True)  # the snapshot holds the marks of turn 1
    inbound = Recorder()
    await nats_client.subscribe(hub.subjects.inbound(TENANT, key), cb=inbound.envelope)
    await nats_client.flush()
    sent_before = len(sends(fake_api))
    stored = time.time()

    again = ConversationActor(actor_key(TENANT, key), hub.ctx)  # the process died; its mail comes back
    await again.on_activate()
    assert again.state.in_seq < 6
    for n in range(4, 7):
        redelivered = user_message(key, n)
        await again.receive(Inbound(redelivered, stored_at=stored))
        await again.receive(Outbound(app_reply(key, n, reply_to=redelivered.id), stored_at=stored, seq=n))
    await nats_client.flush()
    await asyncio.sleep(0.1)

    assert inbound.envelopes == [] and len(sends(fake_api)) == sent_before


# ------------------------------------------------------------------------------- old messages known

async def test_a_long_conversation_still_knows_its_first_messages_after_passivation(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key, inbound, statuses = await long_conversation(hub, nats_client)
    first = user_message(key, 1)
    our_first_native = next(s.native_id for s in statuses.envelopes
                            if isinstance(s, c.Status) and s.message_id == "app-reply-1" and s.state == "sent")
    applied, sent = len(inbound.envelopes), len(sends(fake_api))

    again = ConversationActor(actor_key(TENANT, key), hub.ctx)  # a new activation, from the store only
    await again.on_activate()
    await again.receive(Inbound(first))  # redelivered, or retried by the channel, long after
    await again.receive(Outbound(app_reply(key, 1, reply_to=first.id)))  # the app's first answer, again
    await again.receive(Outbound(app_reply(key, 0, reply_to=first.id)))  # a new answer to the first message
    reaction = user_message(key, 5_000, c.Reaction(emoji="👍", target=c.message_id(TENANT, "tg", our_first_native)))
    await again.receive(Inbound(reaction))
    receipt = c.Status(id="status-of-first", tenant=TENANT, conversation=chat_of(key), ts=c.now(),
                       direction="inbound", native_id=our_first_native,
                       message_id=c.message_id(TENANT, "tg", our_first_native), state="read")
    await again.receive(Inbound(receipt))
    await asyncio.sleep(0.2)

    assert [e.id for e in inbound.envelopes[applied:]] == [reaction.id]  # the first message is not repeated
    assert [body["text"] for body in sends(fake_api)[sent:]] == ["answer 0"]  # nor the first answer
    assert sends(fake_api)[-1]["reply_parameters"] == {"message_id": 1}  # replies still name it
    seen = inbound.envelopes[-1]
    assert isinstance(seen, c.Message) and seen.parts[0] == c.Reaction(emoji="👍", target="app-reply-1")
    status = statuses.envelopes[-1]
    assert isinstance(status, c.Status) and status.state == "read" and status.message_id == "app-reply-1"


async def test_facts_a_snapshot_records_survive_a_crash_before_they_are_written(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()
    first = user_message(key, 1)
    await actor.receive(Inbound(first))
    await actor.save_snapshot()  # the process dies here, before the facts have keys of their own
    fresh = Memory(hub.ctx.snapshots, hub.subjects.bucket("conversations"), hub.publisher, actor_key(TENANT, key))
    assert await fresh.get(Fact.MESSAGE, first.id) is None

    inbound = Recorder()
    await nats_client.subscribe(hub.subjects.inbound(TENANT, key), cb=inbound.envelope)
    again = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await again.on_activate()
    await again.receive(Inbound(first))  # JetStream redelivers what was not acknowledged
    await again.receive(Outbound(app_reply(key, 1, reply_to=first.id)))
    await again.checkpoint()
    await asyncio.sleep(0.1)

    assert inbound.envelopes == []
    assert sends(fake_api)[-1]["reply_parameters"] == {"message_id": 1}
    written = Memory(hub.ctx.snapshots, hub.subjects.bucket("conversations"), hub.publisher, actor_key(TENANT, key))
    assert await written.get(Fact.MESSAGE, first.id) == f"{CHAT}:1"


async def test_a_snapshot_of_the_earlier_layout_is_read_and_moved(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(unpaced(telegram_config(nats_server.url, fake_api.base_url)))
    key = c.conversation_id(TENANT, "tg", CHAT)
    first = user_message(key, 1)
    earlier = {"tenant": TENANT, "conversation": msgspec.to_builtins(chat_of(key)), "participants": {"ada": "Ada"},
               "native_ids": {first.id: f"{CHAT}:1"}, "canonical_ids": {f"{CHAT}:1": first.id},
               "aliases": {c.message_id(TENANT, "tg", f"{CHAT}:900"): "app-old"}, "applied": [first.id],
               "out_seq": 0}
    await hub.ctx.snapshots.put(actor_key(TENANT, key), msgspec.msgpack.encode(earlier))
    inbound = Recorder()
    await nats_client.subscribe(hub.subjects.inbound(TENANT, key), cb=inbound.envelope)

    actor = ConversationActor(actor_key(TENANT, key), hub.ctx)
    await actor.on_activate()
    await actor.receive(Inbound(first))
    await actor.receive(Outbound(app_reply(key, 1, reply_to=first.id)))
    await actor.receive(Inbound(user_message(
        key, 2, c.Reaction(emoji="👍", target=c.message_id(TENANT, "tg", f"{CHAT}:900")))))
    await actor.checkpoint()
    await asyncio.sleep(0.1)

    assert [e.id for e in inbound.envelopes] == [user_message(key, 2).id]
    reaction = inbound.envelopes[0]
    assert isinstance(reaction, c.Message) and reaction.parts[0] == c.Reaction(emoji="👍", target="app-old")
    assert sends(fake_api)[-1]["reply_parameters"] == {"message_id": 1}
    stored = msgspec.msgpack.decode((await hub.ctx.snapshots.get(actor_key(TENANT, key))).value or b"")
    assert "native_ids" not in stored and "applied" not in stored and stored["participants"] == {"ada": "Ada"}


# -------------------------------------------------------------------------------------- expiry

async def test_facts_expire_by_themselves(nats_server: EmbeddedServer, nats_client: NATS) -> None:
    js = nats_client.jetstream()
    subjects = Subjects(prefix=unique_prefix())
    await provision(js, subjects, 60.0)
    kv = await js.key_value(subjects.bucket("conversations"))
    publisher = Publisher(nats_client, js)
    memory = Memory(kv, subjects.bucket("conversations"), publisher, "acme.conv", retention=1.0)
    memory.put(Fact.MESSAGE, "m1", "42:1")
    await memory.flush()
    reader = Memory(kv, subjects.bucket("conversations"), publisher, "acme.conv")
    assert await reader.get(Fact.MESSAGE, "m1") == "42:1"

    await asyncio.sleep(2.5)
    assert await Memory(kv, subjects.bucket("conversations"), publisher, "acme.conv").get(Fact.MESSAGE, "m1") is None


async def test_provision_lets_an_earlier_bucket_take_expiring_keys(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    subjects = Subjects(prefix=unique_prefix())
    bucket = subjects.bucket("conversations")
    await js.add_stream(StreamConfig(  # a bucket as earlier clients made them: no per-message TTL
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], max_msgs_per_subject=1, allow_rollup_hdrs=True,
        deny_delete=True, discard=DiscardPolicy.NEW, storage=StorageType.FILE, allow_msg_ttl=False))

    await provision(js, subjects, 60.0)

    assert (await js.stream_info(f"KV_{bucket}")).config.allow_msg_ttl is True


# ----------------------------------------------------------------------------------- hub restart

async def test_a_restarted_hub_absorbs_a_channel_retry_and_a_repeated_answer(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, tmp_path: Path,
        hub_processes: list[HubProcess]) -> None:
    fake_api.responder = telegram_responder
    port, prefix = free_port(), unique_prefix()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_server.url}"
subject_prefix = "{prefix}"
dedup_window_seconds = 1.0
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
    await post(url, telegram_update(1, 42, "hello"))
    hello, _ = await app.next()
    answer = await app.reply(hello, c.Text(text="hi there"))
    assert (await app.next_status()).state == "sent"
    kv = await nats_client.jetstream().key_value(f"{prefix}_conversations")
    memory = Memory(kv, f"{prefix}_conversations", Publisher(nats_client, nats_client.jetstream()),
                    actor_key(TENANT, hello.conversation.id))
    for _ in range(100):  # the answer's turn is checkpointed (and acknowledged)
        if await memory.get(Fact.MESSAGE, answer.id) is not None:
            break
        memory = Memory(kv, f"{prefix}_conversations", Publisher(nats_client, nats_client.jetstream()),
                        actor_key(TENANT, hello.conversation.id))
        await asyncio.sleep(0.05)
    first.stop()  # kill -9

    second = HubProcess(config, tmp_path, "hub2.log")
    hub_processes.append(second)
    second.start()
    await second.wait_ready(url)
    await asyncio.sleep(1.5)  # past JetStream's dedup window: only the conversation's own memory is left
    await post(url, telegram_update(1, 42, "hello"))  # the channel retries the first update
    await app.send(answer)  # the app repeats its answer
    await post(url, telegram_update(2, 42, "still there?"))
    later, _ = await app.next()

    assert isinstance(later, c.Message) and later.parts == [c.Text(text="still there?")]
    assert app.inbound.empty()
    assert [body["text"] for body in sends(fake_api)] == ["hi there"]


async def post(url: str, update: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            f"{url}/webhooks/telegram/tg", json=update,
            headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
        assert response.status == 200, await response.text()


async def test_facts_the_server_refuses_stay_for_the_next_try(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    subjects = Subjects(prefix=unique_prefix())
    bucket = subjects.bucket("conversations")
    await js.add_stream(StreamConfig(  # refuses expiring keys until provision allows them
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], max_msgs_per_subject=1, allow_rollup_hdrs=True,
        deny_delete=True, discard=DiscardPolicy.NEW, storage=StorageType.FILE, allow_msg_ttl=False))
    kv = await js.key_value(bucket)
    memory = Memory(kv, bucket, Publisher(nats_client, js), "acme.conv")
    memory.put(Fact.MESSAGE, "m1", "42:1")

    with pytest.raises(TimeoutError):
        await memory.flush()
    assert memory.pending() != []

    await provision(js, subjects, 60.0)
    await memory.flush()
    assert memory.pending() == []
    assert await Memory(kv, bucket, Publisher(nats_client, js), "acme.conv").get(Fact.MESSAGE, "m1") == "42:1"
