"""The `redis` processor transport against a real redis-server and a real nats-server: inbound envelopes
appended to a Redis stream (in order, once, through a Redis crash), the app's answers read with a
consumer group (sent once, refused ones dead-lettered, unacknowledged ones claimed after a hub restart)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.plugins import Services
from babelhub.processors.redis import RedisTransport
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.services.routing import HOPS_HEADER, ORIGIN_HEADER
from tests.fakeapi import FakeApi
from tests.hubkit import (
    SECRET,
    TENANT,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
)
from tests.rediskit import RedisServer, started_redis

ROOT = Path(__file__).resolve().parents[1]
INBOUND, OUTBOUND = f"babelhub:{TENANT}:inbound", f"babelhub:{TENANT}:outbound"
CHAT = 4242


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = await started_redis(tmp_path)
    yield server
    server.kill()


@pytest.fixture
async def app(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """The processing app's own Redis client."""
    client = redis_server.client()
    yield client
    await client.aclose()


def redis_config(nats_url: str, api_base: str, url: str, **options: Any) -> cfg.Config:
    config = telegram_config(nats_url, api_base)
    processor = cfg.Processor(id="app", tenant=TENANT, transport="redis", secrets={"url": url}, options=options)
    return msgspec.structs.replace(config, processors=[processor])


async def post_updates(hub_url: str, texts: list[str], first_update: int = 1, pause: float = 0.0) -> None:
    async with aiohttp.ClientSession() as session:
        for number, text in enumerate(texts, first_update):
            async with session.post(hub_url + "/webhooks/telegram/tg", json=telegram_update(number, CHAT, text),
                                    headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as answer:
                assert answer.status == 200
            await asyncio.sleep(pause)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Wait until the async `check()` is true, bounded (the hub and Redis work asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _answered(check):
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def _answered(check: Callable[[], Awaitable[bool]]) -> bool:
    """`check()`, false while Redis is away (the client's connection to a killed server fails once)."""
    try:
        return await check()
    except redis.exceptions.ConnectionError:
        return False


def inbound_reaches(client: aioredis.Redis, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int(await client.xlen(INBOUND)) >= count
    return check


def nothing_pending(client: aioredis.Redis) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pending(client) == 0
    return check


def only_consumer(client: aioredis.Redis, name: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        consumers = await client.xinfo_consumers(OUTBOUND, "babelhub")
        return [consumer["name"].decode() for consumer in consumers] == [name]
    return check


def letters_reach(hub: Any, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await letters(hub)) >= count
    return check


async def inbound_entries(client: aioredis.Redis) -> list[dict[str, str]]:
    return [{key.decode(): value.decode() for key, value in fields.items()}
            for _, fields in await client.xrange(INBOUND)]


def texts_of(entries: list[dict[str, str]]) -> list[str]:
    texts = []
    for entry in entries:
        envelope = c.decode(entry["envelope"])
        assert isinstance(envelope, c.Message) and isinstance(envelope.parts[0], c.Text)
        texts.append(envelope.parts[0].text)
    return texts


def reply(text: str, conversation: str = "", **fields: Any) -> bytes:
    named = {"id": conversation} if conversation else {"connection": "tg", "native_id": str(CHAT)}
    return json.dumps({"conversation": named, "parts": [{"type": "text", "text": text}], **fields}).encode()


def sent_texts(api: FakeApi) -> list[str]:
    return [call.json()["text"] for call in api.requests if call.path.endswith("/sendMessage")]


async def pending(client: aioredis.Redis) -> int:
    summary = await client.xpending(OUTBOUND, "babelhub")
    return int(summary["pending"])


async def letters(hub: Any) -> list[dict[str, Any]]:
    return dead_letters(await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.dlq.>",
                                              hub.subjects.stream_name("dead_letters")))


# ------------------------------------------------------------------------------------------ inbound


async def test_inbound_envelopes_reach_the_redis_stream_in_order_with_their_delivery_ids(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
    texts = [f"message {n}" for n in range(8)]
    await post_updates(hub.http_url, texts)
    await until(inbound_reaches(app, len(texts)))
    entries = await inbound_entries(app)
    assert texts_of(entries) == texts
    transport = next(t for t in hub._started().transports if isinstance(t, RedisTransport))
    for entry in entries:
        envelope = c.decode(entry["envelope"])
        assert entry["id"] == envelope.id and entry["conversation"] == envelope.conversation.id
        assert entry["delivery"] == transport.delivery_of(envelope) and entry["hops"] == "0"
    assert len({entry["delivery"] for entry in entries}) == len(texts)
    js = hub.nc.jetstream()
    info = await js.consumer_info(hub.subjects.stream_name("messages"), "processor-app")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_redelivered_inbound_envelope_is_appended_once(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    """JetStream delivers the same message again when the hub's ack was lost after Redis took the entry
    (the hub died in between): handed the stored message once more, the transport appends nothing."""
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
    await post_updates(hub.http_url, ["only once"])
    await until(inbound_reaches(app, 1))
    js = hub.nc.jetstream()
    again = await js.pull_subscribe(f"{hub.subjects.prefix}.{TENANT}.in.>", stream=hub.subjects.stream_name("messages"))
    [msg] = await again.fetch(1, timeout=5)
    transport = next(t for t in hub._started().transports if isinstance(t, RedisTransport))
    await transport.deliver(msg, c.decode(msg.data))
    assert texts_of(await inbound_entries(app)) == ["only once"]
    await again.unsubscribe()


async def test_redis_killed_and_restarted_while_inbound_flows_loses_and_repeats_nothing(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, tmp_path: Path) -> None:
    """Redis keeps what it acknowledged (an append-only file fsynced before each answer): every inbound
    envelope is in the stream exactly once, in order, though Redis died and came back meanwhile."""
    server = await started_redis(tmp_path, durable=True)
    client = server.client()
    try:
        hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, server.url))
        texts = [f"flow {n}" for n in range(30)]
        flowing = asyncio.create_task(post_updates(hub.http_url, texts, pause=0.03))
        await until(inbound_reaches(client, 8))
        server.kill()
        await asyncio.sleep(1.0)  # inbound keeps coming meanwhile; the hub retries
        await server.restart()
        await flowing
        await until(inbound_reaches(client, len(texts)), timeout=30)
        await asyncio.sleep(0.5)  # time for a duplicate to show up, if one were coming
        entries = await inbound_entries(client)
        assert texts_of(entries) == texts
        assert len({entry["delivery"] for entry in entries}) == len(texts)
    finally:
        await client.aclose()
        server.kill()


# ------------------------------------------------------------------------------------------ outbound


async def test_an_answer_appended_by_the_app_is_sent_once_and_acknowledged(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
    await app.xadd(OUTBOUND, {"envelope": reply("hello from redis")})
    await eventually(lambda: sent_texts(fake_api) == ["hello from redis"])
    await until(nothing_pending(app))
    assert await pending(app) == 0
    messages = hub.subjects.stream_name("messages")
    stored = await stream_messages(hub.nc, f"{hub.subjects.prefix}.{TENANT}.out.>", messages)
    assert len(stored) == 1
    assert await letters(hub) == []


async def test_hub_processes_share_the_group_and_each_answer_is_sent_once(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    fake_api.responder = telegram_responder
    config = redis_config(nats_server.url, fake_api.base_url, redis_server.url)
    hubs = [await start_hub(config), await start_hub(config)]
    texts = [f"answer {n}" for n in range(20)]
    for text in texts:
        await app.xadd(OUTBOUND, {"envelope": reply(text)})
    await eventually(lambda: sorted(sent_texts(fake_api)) == sorted(texts))
    await until(nothing_pending(app))
    consumers = {info["name"].decode() for info in await app.xinfo_consumers(OUTBOUND, "babelhub")}
    assert consumers == {hub._started().ownership.member for hub in hubs}
    await asyncio.sleep(0.5)
    assert sorted(sent_texts(fake_api)) == sorted(texts)


async def test_an_answer_the_hub_cannot_store_while_nats_is_down_stays_pending_and_is_sent_once_after(
        tmp_path: Path, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    fake_api.responder = telegram_responder
    nats_server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await nats_server.start()
    try:
        hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
        await outage_and_back(hub, nats_server, fake_api, app)
    finally:
        await nats_server.stop()


async def outage_and_back(hub: Any, nats_server: EmbeddedServer, fake_api: FakeApi, app: aioredis.Redis) -> None:
    try:
        await nats_server.stop()
        await eventually(lambda: not hub.nc.is_connected)
        await app.xadd(OUTBOUND, {"envelope": reply("after the outage")})
        # The hub read it and could not store it: the reading task failed (its supervisor restarts it).
        await eventually(lambda: hub.task_health["redis-outbound:app"].crashes >= 1, timeout=30)
        assert await pending(app) == 1 and sent_texts(fake_api) == []
        await nats_server.start()
        await eventually(lambda: sent_texts(fake_api) == ["after the outage"], timeout=60)
        await until(nothing_pending(app))
        await asyncio.sleep(0.5)
        assert sent_texts(fake_api) == ["after the outage"]
    finally:
        await hub.stop()  # before its NATS server goes


@pytest.mark.parametrize(("given", "stored"), [("2", "3"), ("-5", "1"), ("99999", "1")])
async def test_an_answer_carries_its_origin_and_one_hop_more_than_the_inbound_it_copies(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis, given: str, stored: str) -> None:
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
    await app.xadd(OUTBOUND, {"envelope": reply("hop"), "hops": given})
    js = hub.nc.jetstream()
    subscription = await js.subscribe(f"{hub.subjects.prefix}.{TENANT}.out.>", ordered_consumer=True,
                                      stream=hub.subjects.stream_name("messages"))
    msg = await subscription.next_msg(timeout=15)
    await subscription.unsubscribe()
    assert msg.headers is not None
    assert (msg.headers[ORIGIN_HEADER], msg.headers[HOPS_HEADER]) == ("app", stored)


async def test_a_malformed_answer_is_a_dead_letter_with_its_path_and_is_acknowledged(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
    broken = json.dumps({"conversation": {"connection": "tg", "native_id": str(CHAT)}, "parts": [{"type": "text"}]})
    await app.xadd(OUTBOUND, {"envelope": broken})
    await app.xadd(OUTBOUND, {"text": "no envelope at all"})
    await app.xadd(OUTBOUND, {"envelope": reply("bad key"), "idempotency_key": b"\xff\xfe"})
    await app.xadd(OUTBOUND, {"envelope": reply("long key"), "idempotency_key": "k" * 300})
    await app.xadd(OUTBOUND, {"envelope": reply("x" * hub.config.hub.max_body_bytes)})
    await app.xadd(OUTBOUND, {"envelope": reply("still flowing")})
    await eventually(lambda: sent_texts(fake_api) == ["still flowing"])
    await until(letters_reach(hub, 5))
    await until(nothing_pending(app))
    found = await letters(hub)
    assert [(letter["stage"], letter.get("path", "")) for letter in found] == [
        ("processor", "$.parts[0]"), ("processor", "$"), ("processor", "idempotency_key"), ("processor", ""),
        ("processor", "$")]
    assert found[3]["error"].startswith("invalid_idempotency_key") and found[4]["error"].startswith("too_large")
    assert found[0]["body"] == broken.encode() and found[0]["subject"] == f"redis:{OUTBOUND}"
    assert await pending(app) == 0
    assert sent_texts(fake_api) == ["still flowing"]


async def test_an_answer_sent_but_not_acknowledged_before_the_hub_stopped_is_sent_once_after_restart(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis) -> None:
    """The hub's Redis user may not XACK at first (a Redis ACL): the answer is stored and sent, but stays
    pending when the hub stops. The next hub claims it and, by its idempotency key, sends nothing again."""
    fake_api.responder = telegram_responder
    await app.execute_command("ACL", "SETUSER", "hub", "on", ">hub-password-1", "~*", "&*", "+@all", "-xack")
    url = f"redis://hub:hub-password-1@127.0.0.1:{redis_server.port}/0"
    config = redis_config(nats_server.url, fake_api.base_url, url, claim_idle_seconds=0.5)
    first = await start_hub(config)
    await app.xadd(OUTBOUND, {"envelope": reply("exactly once")})
    await eventually(lambda: sent_texts(fake_api) == ["exactly once"])
    await asyncio.sleep(0.5)  # the hub tries XACK again meanwhile (and is refused again)
    assert await pending(app) == 1
    await first.stop()
    await app.execute_command("ACL", "SETUSER", "hub", "+xack")
    second = await start_hub(config)
    await until(nothing_pending(app))
    assert await pending(app) == 0
    await asyncio.sleep(0.5)
    assert sent_texts(fake_api) == ["exactly once"]
    # The stopped hub's consumer, emptied by the claim, is forgotten: names do not pile up in the group.
    await until(only_consumer(app, second._started().ownership.member), timeout=30)


async def test_the_redis_password_never_shows_in_logs_or_dead_letters(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    password = "redis-pw-7f3a9c2e51"
    server = await started_redis(tmp_path, password=password)
    client = server.client()
    caplog.set_level(logging.DEBUG)
    try:
        hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, server.url))
        # An app that leaks the password into what the hub refuses, then Redis failing under the hub.
        await client.xadd(OUTBOUND, {"envelope": json.dumps({"parts": [{"type": "text", "text": password}]})})
        await until(letters_reach(hub, 1))
        server.kill()
        await post_updates(hub.http_url, ["while redis is down"])
        await asyncio.sleep(1.0)
        await server.restart()
        await until(inbound_reaches(client, 1), timeout=30)
        assert await client.xlen(INBOUND) == 1
        found = await letters(hub)
        assert len(found) == 1 and b"***" in found[0]["body"]
        assert password not in repr(found)
        assert "cannot append to Redis stream" in caplog.text
        assert password not in caplog.text
    finally:
        await client.aclose()
        server.kill()


# ------------------------------------------------------------------------------------------ settings


async def test_the_hub_starts_and_stays_ready_while_redis_is_away(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> None:
    """Redis is the app's way in: its absence shows in the log, not in `/readyz` (which would take the
    hub's webhooks out of a load balancer)."""
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, f"redis://127.0.0.1:{free_port()}/0"))
    await post_updates(hub.http_url, ["nobody reads this yet"])
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(hub.http_url + "/readyz") as answer:
                assert answer.status == 200, await answer.text()
            await asyncio.sleep(0.3)


def test_a_hub_without_a_redis_processor_never_imports_redis() -> None:
    code = ("import sys, babelhub.hub.app, babelhub.plugins, babelhub.hub.cli; "
            "loaded = sorted(name for name in sys.modules if name == 'redis' or name.startswith('redis.')); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)



def transport_of(processor: cfg.Processor) -> RedisTransport:
    config = cfg.Config(tenants=[cfg.Tenant(id=TENANT)], processors=[processor])
    return RedisTransport(processor, cast(Services, SimpleNamespace(config=config)))


@pytest.mark.parametrize(("secrets", "options", "error"), [
    ({}, {}, r"\$\.processors\[0\]\.secrets: Object missing required field `url`"),
    ({"url": "http://user:topsecret-pw@host"}, {}, r"\$\.processors\[0\]\.secrets\.url: expected a redis://"),
    ({"url": "redis://127.0.0.1"}, {"max_len": 0}, r"\$\.processors\[0\]\.options\.max_len"),
    ({"url": "redis://127.0.0.1"}, {"claim_idle": 5}, r"\$\.processors\[0\]\.options: Object contains unknown field"),
])
def test_settings_are_checked_with_their_path_and_never_echo_a_secret(
        secrets: dict[str, str], options: dict[str, Any], error: str) -> None:
    processor = cfg.Processor(id="app", tenant=TENANT, transport="redis", secrets=secrets, options=options)
    with pytest.raises(ConfigError, match=error) as refused:
        transport_of(processor)
    assert "topsecret" not in str(refused.value)


def test_streams_default_to_the_tenants() -> None:
    transport = transport_of(cfg.Processor(id="app", tenant=TENANT, transport="redis",
                                           secrets={"url": "redis://127.0.0.1"}))
    assert (transport.inbound_stream, transport.outbound_stream) == (INBOUND, OUTBOUND)


# ------------------------------------------------------------------------------------------ example


def run_example(url: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "examples" / "redis_processor.py"), "--url", url,
                                 "--tenant", TENANT], stdout=log, stderr=subprocess.STDOUT)


async def test_the_example_processor_answers_through_redis(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, redis_server: RedisServer,
        app: aioredis.Redis, tmp_path: Path) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(redis_config(nats_server.url, fake_api.base_url, redis_server.url))
    example = run_example(redis_server.url, tmp_path / "example.log")
    try:
        await post_updates(hub.http_url, ["ping", "pong"])
        await eventually(lambda: sent_texts(fake_api) == ["echo: ping", "echo: pong"], timeout=30)
        await until(nothing_pending(app))
        assert await pending(app) == 0
        assert example.poll() is None, (tmp_path / "example.log").read_text()
    finally:
        example.kill()
        example.wait()
