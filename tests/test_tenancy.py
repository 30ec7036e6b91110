"""Tenants are isolated on every path: attacks by one tenant's processor on another tenant's chats, the
secrets a hub holds, its metrics labels, and the embedded nats-server's credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub import codecs
from babelhub.codecs.base import DecodeContext, HttpRequest
from babelhub.errors import DecodeError
from babelhub.hub import cli
from babelhub.hub.app import Hub
from babelhub.redaction import SecretMask
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.deadletters import DeadLetter
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import (
    Processor,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
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
    parked = {json.loads(letter["body"])["id"] for letter in letters}
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


# ------------------------------------------------------------------------------------------- secrets

FIXTURES = Path(__file__).parent / "fixtures"
EVOLUTION_APIKEY = "6B1F0C3E9A2D4E7F8A1B2C3D4E5F6A7B"  # what the Evolution webhook fixtures carry in `apikey`
LOOP_TOKEN, LOOP_SECRET = "333333:LOOP-bot-token-behind-a-redirect", "secret-token-of-the-loop-bot"
BEARER = "eyJhbGciOiJSUzI1NiJ9.bearer-token-of-a-caller.c2lnbmF0dXJl"
COOKIE = "session-cookie-value-0123456789"
SECRETS = [TOKEN_A, SECRET_A, LOOP_TOKEN, LOOP_SECRET, EVOLUTION_APIKEY, BEARER, COOKIE]


def failing_telegram(request: Recorded) -> Reply:
    """A Bot API behind a proxy that echoes the URL it was called on (bot token included) in its 5xx."""
    return Reply(status=500, body={"ok": False, "error_code": 500,
                                   "description": f"Internal Server Error at {request.path}"})


def redirect_loop(request: Recorded) -> Reply:
    """An endpoint redirecting to itself: aiohttp's TooManyRedirects repr holds the whole URL."""
    return Reply(status=302, headers={"Location": request.path})


def secrets_config(nats_url: str, api_base: str, loop_base: str) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(),
                            send_deadline_seconds=2.0),
        tenants=[cfg.Tenant(id="alpha")],
        connections=[
            cfg.Connection(id="tg", tenant="alpha", channel="telegram", api_base=api_base,
                           secrets={"bot_token": TOKEN_A, "secret_token": SECRET_A}),
            cfg.Connection(id="tg-loop", tenant="alpha", channel="telegram", api_base=loop_base, mode="polling",
                           secrets={"bot_token": LOOP_TOKEN, "secret_token": LOOP_SECRET},
                           options={"poll_timeout": 0}),
            cfg.Connection(id="evo", tenant="alpha", channel="evolution", api_base=loop_base,
                           secrets={"apikey": EVOLUTION_APIKEY}, options={"instance": "loja-centro"}),
        ],
    )


async def post_raw(hub: Hub, path: str, body: bytes, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.post(
        hub.http_url + path, data=body, headers={"Content-Type": "application/json", **headers}) as response:
        return response.status


async def stored_everywhere(nats_client: NATS, hub: Hub) -> list[bytes]:
    """Every message in every stream of this hub (raw, messages, statuses, dead letters, KV buckets);
    dead letters are msgpack, so the bodies they keep are there byte for byte."""
    js = nats_client.jetstream()
    found: list[bytes] = []
    names = [hub.subjects.stream_name(role) for role in hub.subjects.streams()]
    names += [f"KV_{hub.subjects.bucket(role)}" for role in ("conversations", "cursors")]
    for name in names:
        info = await js.stream_info(name)
        for subject in info.config.subjects or []:
            found += await stream_messages(nats_client, subject, name)
    return found


async def test_no_secret_reaches_logs_records_statuses_or_dead_letters(
        nats_server: EmbeddedServer, nats_client: NATS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api, loop = FakeApi(failing_telegram), FakeApi(redirect_loop)
    await api.start()
    await loop.start()
    try:
        async with Hub(secrets_config(nats_server.url, api.base_url, loop.base_url)) as hub:
            app = await Processor(nats_client, hub.subjects.prefix, tenant="alpha").start()
            credentials = {"X-Telegram-Bot-Api-Secret-Token": SECRET_A, "Authorization": f"Bearer {BEARER}",
                           "Cookie": f"sid={COOKIE}"}
            update = json.dumps(telegram_update(1, 42, "hi")).encode()
            assert await post_raw(hub, "/webhooks/telegram/tg", update, credentials) == 200
            assert await post_raw(hub, "/webhooks/telegram/tg", b'{"update_id": 2, "message": {',
                                  credentials) == 400  # parked by ingest, with the request's headers
            click = (FIXTURES / "telegram" / "callback_query_keyboard.json").read_bytes()
            assert await post_raw(hub, "/webhooks/telegram/tg", click, credentials) == 200  # answer fails: logged
            evolution = (FIXTURES / "evolution" / "upsert_text.json").read_bytes()
            assert EVOLUTION_APIKEY.encode() in evolution
            assert await post_raw(hub, "/webhooks/evolution/evo", evolution, {}) == 200

            inbound: list[c.Envelope] = []
            while len(inbound) < 3:
                envelope, _ = await app.next()
                inbound.append(envelope)
            first = next(e for e in inbound if e.conversation.connection == "tg" and e.conversation.native_id == "42")
            # A 5xx whose body echoes the token, and a network error whose repr holds the token's URL.
            await app.reply(first, c.Text(text="to the failing API"))
            await app.reply(first, c.Text(text="through the loop"), targets=[c.Target(connection="tg-loop",
                                                                                        to="42")])
            failed: list[c.Status] = []
            while len(failed) < 2:
                status = await app.next_status(timeout=30.0)
                if status.state == "failed":
                    failed.append(status)
            # Both may have reached the channel (a 500, a redirect loop after the request left): neither is
            # sent again; the error names the channel's last answer (and carries it).
            errors = [status.error for status in failed if status.error]
            assert {error.code for error in errors} == {"ambiguous"}
            assert {error.message.split("last: ")[1].split()[0] for error in errors} == {"telegram_500", "network"}
            await eventually(lambda: "poll failed" in caplog.text and "follow-up call" in caplog.text)
            assert api.requests and loop.requests
            assert any(TOKEN_A in request.path for request in api.requests)  # the token was really used
            # Whatever a caller hands the dead-letter stream (an exception's repr, a URL), no secret is kept.
            await hub.dead_letters.park(DeadLetter(
                stage="send", error=f"ClientError for {loop.base_url}/bot{LOOP_TOKEN}/sendMessage", tenant="alpha",
                subject="x", headers={"x-echo": SECRET_A}, body=f'{{"token": "{TOKEN_A}"}}'.encode()))
            stored = await stored_everywhere(nats_client, hub)
    finally:
        await api.stop()
        await loop.stop()

    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert len(stored) > 10
    assert [secret for secret in SECRETS if SecretMask([secret]).found_in(logged)] == []
    leaks = [(secret, item[:200]) for item in stored for secret in SECRETS if SecretMask([secret]).data(item) != item]
    assert leaks == []


def without_id(envelope: c.Envelope) -> c.Envelope:
    return msgspec.structs.replace(envelope, id="")


def test_redaction_keeps_what_decoding_needs() -> None:
    """Every Telegram and Evolution webhook fixture decodes the same once its credentials are taken out."""
    ctx = DecodeContext(tenant="alpha", connection="c", seq=1)
    for channel, secrets, headers in [
        ("telegram", {"bot_token": TOKEN_A, "secret_token": SECRET_A},
         {"x-telegram-bot-api-secret-token": SECRET_A, "authorization": f"Bearer {BEARER}"}),
        ("evolution", {"apikey": EVOLUTION_APIKEY}, {"apikey": EVOLUTION_APIKEY, "cookie": COOKIE}),
    ]:
        codec = codecs.load(channel)
        checked = 0
        for path in sorted((FIXTURES / channel).glob("*.json")):
            request = HttpRequest(body=path.read_bytes(), headers=headers, received_at=1_767_225_600.0)
            try:
                expected = codec.decode(request, ctx)
            except DecodeError:
                continue  # not a webhook fixture (an API answer) or a malformed one
            stored = codec.redact(request, secrets)
            assert stored.headers == {}
            # Taken out by name too: a credential the connection is not configured with, or too short to mask.
            assert codec.redact(request, {}).headers == {}
            assert [secret for secret in secrets.values() if secret.encode() in stored.body] == []
            # Ids of events without native ids fingerprint the (credential-free) body; all else is equal.
            assert [without_id(e) for e in codec.decode(stored, ctx)] == [without_id(e) for e in expected], path.name
            checked += 1
        assert checked > 10, channel
    # Evolution's body field: the webhook's `apikey` is not stored even when it is no configured secret.
    evolution = codecs.load("evolution")
    body = (FIXTURES / "evolution" / "upsert_text.json").read_bytes()
    assert EVOLUTION_APIKEY.encode() in body
    assert EVOLUTION_APIKEY.encode() not in evolution.redact(HttpRequest(body=body), {}).body


# ------------------------------------------------------------------------------------------- metrics

async def test_random_webhook_urls_add_no_metric_series(nats_server: EmbeddedServer, fake_api: FakeApi) -> None:
    async with Hub(telegram_config(nats_server.url, fake_api.base_url)) as hub, aiohttp.ClientSession() as session:
        for n in range(5):
            for method in ("GET", "POST"):
                async with session.request(method, f"{hub.http_url}/webhooks/made-up-{n}/x{n}") as response:
                    assert response.status == 404
        async with session.get(f"{hub.http_url}/metrics") as response:
            metrics = await response.text()
    series = [line for line in metrics.splitlines() if line.startswith("babelhub_webhooks_total")]
    assert series and not any("made-up" in line for line in series)
    assert all('channel="unknown"' in line or 'channel="telegram"' in line for line in series)


# ------------------------------------------------------------------------------ embedded server auth

async def test_the_embedded_server_admits_only_the_hub_and_each_tenant_on_its_own_subjects(
        tmp_path: Path, apis: tuple[FakeApi, FakeApi], capsys: pytest.CaptureFixture[str]) -> None:
    api_a, api_b = apis
    config = two_tenants("", api_a.base_url, api_b.base_url)
    config = msgspec.structs.replace(config, hub=msgspec.structs.replace(
        config.hub, nats="", nats_port=0, data_dir=str(tmp_path / "data"), subject_prefix="bh"))
    async with Hub(config) as hub:
        assert hub.server is not None
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # anonymous
            await nats.connect(hub.nats_url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
        key_file, server_conf = tmp_path / "data" / "nats-auth.key", tmp_path / "data" / "nats-server.conf"
        assert key_file.stat().st_mode & 0o777 == 0o600 and server_conf.stat().st_mode & 0o777 == 0o600

        # What `babelhub credentials alpha` prints is what the processors of tenant alpha connect with.
        toml = tmp_path / "hub.toml"
        toml.write_text(f'[hub]\ndata_dir = "{tmp_path / "data"}"\n'
                        '[[tenants]]\nid = "alpha"\n[[tenants]]\nid = "beta"\n')
        assert cli.main(["credentials", "alpha", "--config", str(toml)]) == 0
        printed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                       if line.startswith("  "))
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        alpha = await nats.connect(hub.nats_url, user=printed["user"], password=printed["password"],
                                   inbox_prefix=printed["inbox_prefix"], error_cb=on_error)
        try:
            app = await Processor(alpha, "bh", tenant="alpha").start()
            assert await post_update(hub, "tg-a", SECRET_A, telegram_update(1, 55, "hello alpha")) == 200
            inbound, _ = await app.next()
            # Replies go through: plain publish, and JetStream publish (its ack comes to the tenant's inbox).
            await app.reply(inbound, c.Text(text="plain publish"))
            reply = outbound("alpha", c.Conversation(id=inbound.conversation.id), "jetstream publish")
            ack = await alpha.jetstream().publish(f"bh.alpha.out.{inbound.conversation.id}", c.encode(reply))
            assert ack.seq > 0
            await eventually(lambda: len([r for r in api_a.requests if "sendMessage" in r.path]) == 2)

            # Nothing of tenant beta's, no JetStream API, and none of what only the hub writes (decoded
            # envelopes, which the conversation's owner applies as the channel's).
            await alpha.subscribe("bh.beta.in.>")
            await alpha.publish("bh.beta.out.x", b"{}")
            await alpha.publish("$JS.API.STREAM.NAMES", b"")
            await alpha.publish(f"bh.alpha.conv.{inbound.conversation.id}", b"{}")
            await alpha.flush()
            await eventually(lambda: len(errors) >= 4)
        finally:
            await alpha.close()
        assert len(errors) == 4 and all("permissions violation" in error.lower() for error in errors)
        assert any('publish to "bh.alpha.conv.' in error.lower() for error in errors)
        assert any('subscription to "bh.beta.in.>"' in error.lower() for error in errors)
        assert any('publish to "bh.beta.out.x"' in error.lower() for error in errors)
        assert any('publish to "$js.api.stream.names"' in error.lower() for error in errors)
        assert api_b.requests == []
