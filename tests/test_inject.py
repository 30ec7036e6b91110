"""Canonical envelopes injected by other services, on NATS (`inject`) and from a Redis stream (`redis`),
entering the hub like webhook traffic: a real nats-server, real hubs, a real redis-server, a processing
app on NATS and a local fake of the Telegram Bot API (the injected connections are Telegram ones, so
that replies go out through a channel)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.codecs.base import HttpRequest
from babelhub.errors import ConfigError, DecodeError
from babelhub.hub import cli
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.injected import read_injected
from tests import strategies
from tests.fakeapi import FakeApi
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    Processor,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_responder,
    telegram_update,
    unique_prefix,
    write_config,
)
from tests.rediskit import RedisServer

OTHER = "globex"
FEED = "feed"
"""The `inject` connection of TENANT (a Telegram account, so replies go out through the fake API)."""
OTHER_FEED = "globex-feed"


@pytest.fixture
async def telegram_api(fake_api: FakeApi) -> FakeApi:
    fake_api.responder = telegram_responder
    return fake_api


def config(nats_url: str, api_base: str, *extra: cfg.Connection, prefix: str = "") -> cfg.Config:
    """Two tenants, each with an `inject` connection; TENANT also has a Telegram webhook (`tg`)."""
    telegram = {"bot_token": BOT_TOKEN, "secret_token": SECRET}
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=prefix or unique_prefix(),
                            max_body_bytes=64 * 1024),
        tenants=[cfg.Tenant(id=TENANT), cfg.Tenant(id=OTHER)],
        connections=[
            cfg.Connection(id="tg", tenant=TENANT, channel="telegram", api_base=api_base, secrets=telegram),
            cfg.Connection(id=FEED, tenant=TENANT, channel="telegram", mode="inject", api_base=api_base,
                           secrets=telegram),
            cfg.Connection(id=OTHER_FEED, tenant=OTHER, channel="telegram", mode="inject", api_base=api_base,
                           secrets=telegram),
            *extra,
        ])


def envelope(key: str, text: str, chat: str = "42", tenant: str = TENANT, **fields: Any) -> dict[str, Any]:
    """An inbound message as another service writes it: its own id, the native chat, the hub fills in
    the rest of the conversation."""
    return {"kind": "message", "id": key, "tenant": tenant, "ts": "2026-12-03T04:00:00Z",
            "conversation": {"id": "", "native_id": chat}, "sender": {"native_id": "7", "name": "Ada"},
            "parts": [{"type": "text", "text": text}], **fields}


async def inject(nc: NATS, prefix: str, body: Any, tenant: str = TENANT, connection: str = FEED) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = await nc.request(f"{prefix}.{tenant}.inject.{connection}", data, timeout=10)
    result: dict[str, Any] = json.loads(answer.data)
    return result


async def inject_letters(nc: NATS, hub: Hub, tenant: str = TENANT) -> list[dict[str, Any]]:
    return dead_letters(await stream_messages(nc, f"{hub.subjects.prefix}.{tenant}.dlq.>",
                                              hub.subjects.stream_name("dead_letters")))


async def raw_records(nc: NATS, hub: Hub, connection: str, tenant: str = TENANT) -> list[HttpRequest]:
    stored = await stream_messages(nc, f"{hub.subjects.prefix}.{tenant}.raw.*.telegram.{connection}",
                                   hub.subjects.stream_name("raw"))
    return [msgspec.msgpack.decode(data, type=HttpRequest) for data in stored]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """`eventually` for a check that must await (a Redis or JetStream query)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"condition not met within {timeout}s: {check}"
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------------------- NATS


async def test_an_injected_message_reaches_the_processor_and_its_reply_the_channel(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config(nats_server.url, telegram_api.base_url))
    prefix = hub.subjects.prefix
    app = await Processor(nats_client, prefix).start()

    answer = await inject(nats_client, prefix, envelope("evt-1", "hello from the CRM"))
    hub_id = c.message_id(TENANT, FEED, "evt-1")
    assert answer == {"id": hub_id, "duplicate": False}
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.direction == "inbound"
    assert inbound.id == hub_id and inbound.tenant == TENANT
    assert inbound.parts == [c.Text(text="hello from the CRM")]
    assert inbound.conversation == c.Conversation(id=c.conversation_id(TENANT, FEED, "42"), channel="telegram",
                                                  connection=FEED, native_id="42")
    assert inbound.sender is not None and inbound.sender.id == c.sender_id(TENANT, FEED, "7")
    assert inbound.native is not None and inbound.native.id == "" and inbound.native.seq > 0
    # Recorded like a channel's delivery first, marked as canonical.
    records = await raw_records(nats_client, hub, FEED)
    assert len(records) == 1 and records[0].canonical and json.loads(records[0].body)["id"] == "evt-1"

    await app.reply(inbound, c.Text(text="noted"))
    await eventually(lambda: any("sendMessage" in r.path for r in telegram_api.requests))
    sent = next(r for r in telegram_api.requests if "sendMessage" in r.path).json()
    assert str(sent["chat_id"]) == "42" and sent["text"] == "noted"

    # Activities too.
    typing = {"kind": "activity", "activity": "typing", "id": "typing-1", "tenant": TENANT,
              "ts": "2026-12-03T04:00:01Z", "conversation": {"id": "", "native_id": "42"}}
    assert (await inject(nats_client, prefix, typing))["id"] == c.message_id(TENANT, FEED, "typing-1")
    activity, _ = await app.next()
    assert isinstance(activity, c.Activity) and activity.activity == "typing"
    assert activity.conversation.id == inbound.conversation.id


async def test_the_same_injection_twice_is_recorded_and_processed_once(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config(nats_server.url, telegram_api.base_url))
    prefix = hub.subjects.prefix
    app = await Processor(nats_client, prefix).start()
    # Keyed by the native id when there is one: a retry with another envelope id is the same injection.
    first = envelope("try-1", "once", native={"id": "crm-77"})
    again = envelope("try-2", "once", native={"id": "crm-77"})
    assert (await inject(nats_client, prefix, first))["duplicate"] is False
    assert await inject(nats_client, prefix, again) == {"id": c.message_id(TENANT, FEED, "crm-77"), "duplicate": True}
    assert (await inject(nats_client, prefix, envelope("plain", "after")))["duplicate"] is False
    texts = []
    for _ in range(2):
        inbound, _ = await app.next()
        assert isinstance(inbound, c.Message) and isinstance(inbound.parts[0], c.Text)
        texts.append(inbound.parts[0].text)
    assert texts == ["once", "after"]
    assert len(await raw_records(nats_client, hub, FEED)) == 2


async def test_an_injection_for_another_tenants_connection_is_refused_and_kept(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config(nats_server.url, telegram_api.base_url))
    prefix = hub.subjects.prefix
    app = await Processor(nats_client, prefix).start()
    other_app = await Processor(nats_client, prefix, tenant=OTHER).start()

    # Each tenant names the other's connection: it has no such connection.
    for tenant, connection in ((OTHER, FEED), (TENANT, OTHER_FEED)):
        answer = await inject(nats_client, prefix, envelope("x1", "steal", tenant=tenant), tenant=tenant,
                              connection=connection)
        assert answer["error"]["code"] == "unknown_connection", answer
    # The subject is acme's connection, the envelope names globex (and the reverse).
    answer = await inject(nats_client, prefix, envelope("x3", "steal", tenant=OTHER))
    assert answer == {"error": {"code": "invalid", "path": "$.tenant", "message": answer["error"]["message"]}}
    answer = await inject(nats_client, prefix, envelope("x4", "steal"), tenant=OTHER, connection=OTHER_FEED)
    assert answer["error"]["path"] == "$.tenant"
    # A conversation id of another connection's chat.
    body = envelope("x5", "steal", conversation={"id": c.conversation_id(TENANT, "tg", "42"), "native_id": "42"})
    assert (await inject(nats_client, prefix, body))["error"]["path"] == "$.conversation.id"
    body = envelope("x6", "steal", conversation={"id": "", "native_id": "42", "connection": "tg"})
    assert (await inject(nats_client, prefix, body))["error"]["path"] == "$.conversation.connection"

    assert (await inject(nats_client, prefix, envelope("ok", "mine")))["duplicate"] is False
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="mine")]
    assert app.inbound.empty() and other_app.inbound.empty()
    acme_letters, other_letters = await inject_letters(nats_client, hub), await inject_letters(nats_client, hub, OTHER)
    assert [letter.get("path", "") for letter in acme_letters] == ["", "$.tenant", "$.conversation.id",
                                                           "$.conversation.connection"]
    assert [letter.get("path", "") for letter in other_letters] == ["", "$.tenant"]
    assert all(letter["stage"] == "inject" and b"steal" in letter["body"] for letter in acme_letters + other_letters)
    assert len(await raw_records(nats_client, hub, OTHER_FEED, tenant=OTHER)) == 0


async def test_bad_input_is_answered_with_its_path_and_kept_as_a_dead_letter(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config(nats_server.url, telegram_api.base_url))
    prefix = hub.subjects.prefix
    app = await Processor(nats_client, prefix).start()
    cases: list[tuple[Any, str, str]] = [
        (b'{"kind": "message", "id": ', "invalid", "$"),
        (b"[1, 2]", "invalid", "$"),
        (envelope("b1", "x", parts=[{"type": "text"}]), "invalid", "$.parts[0]"),
        (envelope("b2", "x", conversation={"id": "", "native_id": ""}), "invalid", "$.conversation.native_id"),
        (envelope("b3", "x", chat="4\n2"), "invalid", "$.conversation.native_id"),
        (envelope("", "x"), "invalid", "$.id"),
        (envelope("b4", "x", native={"id": "n" * 300}), "invalid", "$.native.id"),
        (envelope("b5", "x", direction="outbound"), "invalid", "$.direction"),
        (envelope("b6", "x", targets=[{"connection": "tg", "to": "1"}]), "invalid", "$.targets"),
        ({**envelope("b7", "x"), "kind": "status", "message_id": "m"}, "invalid", "$.kind"),
        (envelope("b8", "x" * (64 * 1024)), "too_large", "$"),
    ]
    for body, code, path in cases:
        answer = await inject(nats_client, prefix, body)
        assert answer["error"]["code"] == code and answer["error"]["path"] == path, (body, answer)
    # Without a reply subject there is no one to answer: the dead letter is all there is.
    await nats_client.publish(f"{prefix}.{TENANT}.inject.{FEED}", b"not json")
    answer = await inject(nats_client, prefix, envelope("good", "fine"))
    assert answer["duplicate"] is False
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="fine")] and app.inbound.empty()

    found: list[dict[str, Any]] = []

    async def all_kept() -> bool:
        found[:] = await inject_letters(nats_client, hub)
        return len(found) >= len(cases) + 1

    await until(all_kept)
    assert [letter.get("path", "") for letter in found] == [path for _, _, path in cases] + ["$"]
    assert found[-1]["body"] == b"not json" and all(letter["stage"] == "inject" for letter in found)
    assert found[-2]["body_size"] > 64 * 1024 and len(found[-2]["body"]) <= found[-2]["body_size"]
    assert len(await raw_records(nats_client, hub, FEED)) == 1


async def test_a_webhook_body_shaped_like_an_envelope_is_not_taken_as_one(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub) -> None:
    """Only ingest's own `record_canonical` marks a record canonical: neither a channel's request (whatever
    its body and headers) nor any record handed to `Ingest.record` is read as an envelope."""
    hub = await start_hub(config(nats_server.url, telegram_api.base_url))
    prefix = hub.subjects.prefix
    app = await Processor(nats_client, prefix).start()
    forged = {**envelope("forged-1", "forged", conversation={"id": c.conversation_id(TENANT, "tg", "42"),
                                                            "native_id": "42"}), "update_id": 900}
    forged["canonical"] = True
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json",
               "X-Babelhub-Canonical": "1", "Canonical": "true", "Nats-Msg-Id": "x"}
    async with aiohttp.ClientSession() as session, session.post(
            f"{hub.http_url}/webhooks/telegram/tg", json=forged, headers=headers) as response:
        assert response.status == 200  # a Telegram update (it has an update_id): recorded
    # A request that claims the mark itself, handed to ingest as a source would.
    claiming = HttpRequest(body=json.dumps({**forged, "update_id": 901}).encode(), canonical=True,
                           headers={"x-telegram-bot-api-secret-token": SECRET})
    assert await hub.ingest.record(hub.ctx.connections["tg"], claiming) is True
    async with aiohttp.ClientSession() as session, session.post(
            f"{hub.http_url}/webhooks/telegram/tg", json=telegram_update(902, 42, "after"),
            headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
        assert response.status == 200
    # The connection decodes in order: the forged records are read before "after", as Telegram updates
    # of a kind the codec does not know (kept verbatim as `unsupported`), never as the envelope they carry.
    read = [(await app.next())[0] for _ in range(3)]
    assert all(isinstance(inbound, c.Message) for inbound in read)
    assert [type(inbound.parts[0]) for inbound in read if isinstance(inbound, c.Message)] == [
        c.Unsupported, c.Unsupported, c.Text]
    assert c.message_id(TENANT, "tg", "forged-1") not in {inbound.id for inbound in read}
    assert app.inbound.empty()
    records = await raw_records(nats_client, hub, "tg")
    assert len(records) == 3 and not any(record.canonical for record in records)


async def test_a_tenants_nats_user_may_inject_for_itself_only(
        tmp_path: Path, telegram_api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    settings = config("", telegram_api.base_url, prefix="bh")
    settings = msgspec.structs.replace(settings, hub=msgspec.structs.replace(
        settings.hub, nats_port=0, data_dir=str(tmp_path / "data")))
    async with Hub(settings) as hub:
        toml = write_config(tmp_path / "hub.toml", f'[hub]\ndata_dir = "{tmp_path / "data"}"\n'
                                                   f'[[tenants]]\nid = "{TENANT}"\n')
        assert cli.main(["credentials", TENANT, "--config", str(toml)]) == 0
        printed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("  "))
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        acme = await nats.connect(hub.nats_url, user=printed["user"], password=printed["password"],
                                  inbox_prefix=printed["inbox_prefix"], error_cb=on_error)
        try:
            answer = await inject(acme, "bh", envelope("cred-1", "with my own credentials"))
            assert answer == {"id": c.message_id(TENANT, FEED, "cred-1"), "duplicate": False}
            await acme.publish(f"bh.{OTHER}.inject.{OTHER_FEED}", json.dumps(envelope("c2", "x", OTHER)).encode())
            await acme.publish(f"bh.{TENANT}.raw.telegram.{FEED}", b"{}")
            await acme.flush()
            await eventually(lambda: len(errors) >= 2)
        finally:
            await acme.close()
        assert any(f'publish to "bh.{OTHER}.inject.' in error.lower() for error in errors)
        assert any(f'publish to "bh.{TENANT}.raw.' in error.lower() for error in errors)
        assert all("permissions violation" in error.lower() for error in errors)


# ------------------------------------------------------------------------------------------ Redis


def redis_feed(url: str, stream: str, api_base: str, **options: Any) -> cfg.Connection:
    return cfg.Connection(id="rfeed", tenant=TENANT, channel="telegram", mode="redis", api_base=api_base,
                          secrets={"bot_token": BOT_TOKEN, "secret_token": SECRET},
                          options={"redis_url": url, "stream": stream, "claim_idle_seconds": 1.0, **options})


async def pending(redis_server: RedisServer, stream: str, group: str = "babelhub") -> int:
    client = redis_server.client()
    try:
        summary = await client.xpending(stream, group)
    finally:
        await client.aclose()
    count: int = summary["pending"]
    return count


async def test_redis_entries_are_recorded_then_acknowledged(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub,
        redis_server: RedisServer) -> None:
    stream = f"inbound-{unique_prefix()}"
    hub = await start_hub(config(nats_server.url, telegram_api.base_url,
                                 redis_feed(redis_server.url, stream, telegram_api.base_url)))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    client = redis_server.client()
    try:
        for n in range(3):
            await client.xadd(stream, {"envelope": json.dumps(envelope(f"r{n}", f"from redis {n}"))})
        await client.xadd(stream, {"envelope": json.dumps(envelope("r0", "from redis 0"))})  # a retry
        texts = []
        for _ in range(3):
            inbound, _ = await app.next()
            assert isinstance(inbound, c.Message) and isinstance(inbound.parts[0], c.Text)
            assert inbound.conversation.connection == "rfeed"
            assert inbound.id == c.message_id(TENANT, "rfeed", f"r{len(texts)}")
            texts.append(inbound.parts[0].text)
        assert texts == ["from redis 0", "from redis 1", "from redis 2"]

        async def all_acknowledged() -> bool:
            return await pending(redis_server, stream) == 0

        await until(all_acknowledged)
        groups = await client.xinfo_groups(stream)
        assert [group["name"] for group in groups] == [b"babelhub"] and groups[0]["pending"] == 0
        assert groups[0]["last-delivered-id"] == (await client.xinfo_stream(stream))["last-generated-id"]
    finally:
        await client.aclose()
    assert app.inbound.empty()
    records = await raw_records(nats_client, hub, "rfeed")
    assert len(records) == 3 and all(record.canonical for record in records)
    assert records[0].url.startswith(f"redis:{stream}#")


async def test_a_malformed_entry_is_dead_lettered_and_acknowledged(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub,
        redis_server: RedisServer) -> None:
    stream = f"inbound-{unique_prefix()}"
    hub = await start_hub(config(nats_server.url, telegram_api.base_url,
                                 redis_feed(redis_server.url, stream, telegram_api.base_url, group="hubs")))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    client = redis_server.client()
    try:
        await client.xadd(stream, {"text": "no envelope field"})
        await client.xadd(stream, {"envelope": b"{not json"})
        await client.xadd(stream, {"envelope": json.dumps(envelope("r1", "x", tenant=OTHER))})
        await client.xadd(stream, {"envelope": json.dumps(envelope("r2", "x" * (64 * 1024)))})
        await client.xadd(stream, {"envelope": json.dumps(envelope("r3", "good one"))})
        inbound, _ = await app.next()
        assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="good one")]

        async def all_acknowledged() -> bool:
            return await pending(redis_server, stream, "hubs") == 0

        await until(all_acknowledged)
    finally:
        await client.aclose()
    letters = await inject_letters(nats_client, hub)
    assert [letter.get("path", "") for letter in letters] == ["$", "$", "$.tenant", "$"]
    assert letters[0]["error"] == "the entry has no `envelope` field"
    assert msgspec.msgpack.decode(letters[0]["body"]) == {"text": b"no envelope field"}
    assert letters[1]["body"] == b"{not json" and "malformed JSON" in letters[1]["error"]
    assert all(letter["stage"] == "inject" and letter["connection"] == "rfeed"
               and letter["subject"].startswith(f"redis:{stream}#") for letter in letters)
    assert "hub.max_body_bytes" in letters[3]["error"]
    assert app.inbound.empty() and len(await raw_records(nats_client, hub, "rfeed")) == 1


async def test_an_entry_a_killed_hub_recorded_but_did_not_acknowledge_is_recorded_once(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub,
        redis_server: RedisServer, tmp_path: Path, hub_processes: list[HubProcess]) -> None:
    """A `babelhub run` whose Redis user may not XACK (so that it is killed in the window between record
    and XACK, whatever the timing) takes an entry and is killed; the next hub claims the entry once it
    is idle, records it again (absorbed by JetStream's dedup) and acknowledges it."""
    stream, prefix = f"inbound-{unique_prefix()}", unique_prefix()
    admin = redis_server.client()
    await admin.acl_setuser("hub", enabled=True, passwords=["+hub-pass"], keys=["*"], channels=["*"],
                            commands=["+@all", "-xack"])
    secret_url = redis_server.url.replace("redis://", "redis://hub:hub-pass@")
    toml = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:0"
nats = "{nats_server.url}"
subject_prefix = "{prefix}"
lease_seconds = 2.0
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "rfeed"
tenant = "{TENANT}"
channel = "telegram"
mode = "redis"
api_base = "{telegram_api.base_url}"
secrets = {{ bot_token = "{BOT_TOKEN}", secret_token = "{SECRET}", redis_url = "{secret_url}" }}
options = {{ stream = "{stream}", claim_idle_seconds = 1.0 }}
""")
    app = await Processor(nats_client, prefix).start()
    first = HubProcess(toml, tmp_path)
    hub_processes.append(first)
    first.start()
    try:
        await admin.xadd(stream, {"envelope": json.dumps(envelope("k1", "recorded before the kill"))})
        inbound, _ = await app.next(timeout=30)
        assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="recorded before the kill")]
        assert await pending(redis_server, stream) == 1
        first.stop()  # SIGKILL
        assert "hub-pass" not in first.output()
        await admin.acl_setuser("hub", enabled=True, commands=["+xack"])

        second = await start_hub(cfg.load(toml, env={}, overrides={"http": "127.0.0.1:0"}))

        async def all_acknowledged() -> bool:
            return await pending(redis_server, stream) == 0

        await until(all_acknowledged)
        records = await raw_records(nats_client, second, "rfeed")
        assert len(records) == 1 and records[0].canonical
        await admin.xadd(stream, {"envelope": json.dumps(envelope("k2", "after the restart"))})
        # Stored once for the processors. (A core-NATS subscriber may see the first one again, with the same
        # id, when the kill came before the conversation's turn was acknowledged: it deduplicates on `id`.)
        seen = [inbound]
        while not (isinstance(seen[-1], c.Message) and seen[-1].parts == [c.Text(text="after the restart")]):
            seen.append((await app.next(timeout=30))[0])
        assert {envelope.id for envelope in seen[:-1]} == {c.message_id(TENANT, "rfeed", "k1")}
        stored = await stream_messages(nats_client, f"{prefix}.{TENANT}.in.>", second.subjects.stream_name("messages"))
        assert [c.decode(data).id for data in stored] == [c.message_id(TENANT, "rfeed", key) for key in ("k1", "k2")]
    finally:
        await admin.aclose()


async def test_a_redis_that_cannot_be_reached_fails_only_its_reader_and_no_password_is_logged(
        nats_server: EmbeddedServer, nats_client: NATS, telegram_api: FakeApi, start_hub: StartHub,
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    down = cfg.Connection(id="rfeed", tenant=TENANT, channel="telegram", mode="redis", api_base=telegram_api.base_url,
                          secrets={"bot_token": BOT_TOKEN, "redis_url": f"redis://hub:s3cret-pw@127.0.0.1:{closed}/0"},
                          options={"stream": "s"})
    hub = await start_hub(config(nats_server.url, telegram_api.base_url, down))
    await eventually(lambda: hub.task_health["redis:rfeed"].failing)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    assert (await inject(nats_client, hub.subjects.prefix, envelope("n1", "NATS still works")))["duplicate"] is False
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="NATS still works")]
    assert "task redis:rfeed failed with ConnectionError" in caplog.text
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in hub.metrics.render().decode()


def test_the_redis_settings_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    base = """[[tenants]]\nid = "acme"\n[[connections]]\nid = "r"\ntenant = "acme"\nchannel = "telegram"\n""" \
           """mode = "redis"\nsecrets = { bot_token = "1:x" }\n"""
    with pytest.raises(ConfigError, match=r"\$\.connections\[0\]\.options: Object missing required field `stream`"):
        cfg.load(write_config(tmp_path / "a.toml", base + 'options = { redis_url = "redis://127.0.0.1:1" }\n'))
    with pytest.raises(ConfigError, match=r"\$\.connections\[0\]\.options\.claim_idle_seconds: Expected `float`"):
        cfg.load(write_config(tmp_path / "b.toml", base + 'options = { stream = "s", claim_idle_seconds = "x" }\n'))
    for options, problem in (('stream = ""', "`stream` and `group` must name"),
                             ('stream = "s", claim_idle_seconds = 0.0', "must be more than 0"),
                             ('stream = "s", redis_url = "redis://u:pw@127.0.0.1:1"', "set it as secrets.redis_url")):
        with pytest.raises(ConfigError, match=rf"\$\.connections\[0\]\.options: .*{problem}") as refused:
            cfg.load(write_config(tmp_path / "e.toml", base + f"options = {{ {options} }}\n"))
        assert "pw" not in str(refused.value)
    # The source's own settings are not the channel's, and the channel's are still checked.
    with_secret_url = base.replace('bot_token = "1:x"', 'bot_token = "1:x", redis_url = "redis://u:p@127.0.0.1:1"')
    loaded = cfg.load(write_config(tmp_path / "c.toml", with_secret_url + 'options = { stream = "s" }\n'))
    assert loaded.connections[0].secrets["redis_url"] == "redis://u:p@127.0.0.1:1"
    with pytest.raises(ConfigError, match=r"\$\.connections\[0\]\.options\.streem: telegram takes no such option"):
        cfg.load(write_config(tmp_path / "d.toml", base + 'options = { stream = "s", streem = "t" }\n'))


# ------------------------------------------------------------------------------------------ checks


@settings(max_examples=300, deadline=None)
@given(strategies.envelopes, st.sampled_from([TENANT, OTHER]), st.booleans())
def test_an_injected_envelope_is_taken_as_the_connections_or_refused_with_a_path(
        envelope_: c.Envelope, tenant: str, as_documented: bool) -> None:
    """Whatever envelope is injected, the hub keeps it only as an inbound one of the connection it was
    injected for, under ids it derives itself; anything else is a DecodeError naming a JSON path."""
    envelope_ = msgspec.structs.replace(envelope_, tenant=tenant)
    if as_documented:  # (else the drawn conversation ids, never the derived one, are all refused)
        envelope_ = msgspec.structs.replace(envelope_, direction="inbound", conversation=c.Conversation(
            id="", native_id=envelope_.conversation.native_id))
    try:
        read = read_injected(c.encode(envelope_), TENANT, FEED, "telegram", 9)
    except DecodeError as exc:
        assert exc.path.startswith("$")
        return
    assert read.tenant == TENANT and read.direction == "inbound" and not isinstance(read, c.Status)
    assert read.conversation.connection == FEED and read.conversation.channel == "telegram"
    assert read.conversation.id == c.conversation_id(TENANT, FEED, read.conversation.native_id)
    assert read.id == c.message_id(TENANT, FEED, envelope_.native.id if envelope_.native and envelope_.native.id
                                   else envelope_.id)
    assert read.native is not None and read.native.seq == 9


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_injected_are_an_envelope_or_a_decode_error(data: bytes) -> None:
    try:
        read_injected(data, TENANT, FEED, "telegram")
    except DecodeError as exc:
        assert exc.path.startswith("$")


def test_the_redis_source_needs_no_redis_until_a_connection_uses_it() -> None:
    code = "import sys, babelhub.sources.redis_stream, babelhub.hub.app; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
