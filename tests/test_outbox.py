"""Where processors' outbound envelopes enter the hub (`Outbox.submit`), whatever carried them; and which
processors an inbound envelope is routed to (`routes`), on a real nats-server."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.outbox import MAX_IDEMPOTENCY_KEY, Refusal
from babelhub.services.routing import HOPS_HEADER, MAX_HOPS, ORIGIN_HEADER, hops_of, matches, routed_to
from tests.fakeapi import FakeApi
from tests.hubkit import (
    SECRET,
    TENANT,
    Processor,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
)

CHAT = "4242"


def with_other_tenant(config: cfg.Config, api_base: str) -> cfg.Config:
    """`config` plus tenant "other" with a Telegram connection of its own ("tg-other")."""
    other = cfg.Connection(id="tg-other", tenant="other", channel="telegram", api_base=api_base,
                           secrets={"bot_token": "1:other", "secret_token": "other-secret"})
    return msgspec.structs.replace(config, tenants=[*config.tenants, cfg.Tenant(id="other")],
                                   connections=[*config.connections, other])


def sends(api: FakeApi) -> list[dict[str, Any]]:
    return [call.json() for call in api.requests if call.path.endswith("/sendMessage")]


def body(**fields: Any) -> bytes:
    message = {"conversation": {"connection": "tg", "native_id": CHAT}, "parts": [{"type": "text", "text": "hi"}]}
    return json.dumps({**message, **fields}).encode()


@pytest.fixture
async def hub_and_app(nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi,
                      start_hub: StartHub) -> tuple[Any, Processor]:
    fake_api.responder = telegram_responder
    hub = await start_hub(with_other_tenant(telegram_config(nats_server.url, fake_api.base_url), fake_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    return hub, app


async def test_a_submitted_message_is_completed_stored_and_sent(hub_and_app: tuple[Any, Processor],
                                                                 fake_api: FakeApi) -> None:
    hub, app = hub_and_app
    accepted = await hub.outbox.submit(TENANT, body(), origin="crm")
    assert accepted.status == "accepted" and not accepted.duplicate
    assert accepted.conversation == c.conversation_id(TENANT, "tg", CHAT)
    status = await app.next_status()
    assert (status.message_id, status.state) == (accepted.id, "sent")
    sent = [call.json() for call in fake_api.requests if call.path.endswith("/sendMessage")]
    assert [(str(item["chat_id"]), item["text"]) for item in sent] == [(CHAT, "hi")]
    messages = hub.subjects.stream_name("messages")
    stored = await stream_messages(hub.nc, f"{hub.subjects.prefix}.{TENANT}.out.>", messages)
    envelope = c.decode(stored[0])
    assert (envelope.id, envelope.direction, envelope.tenant) == (accepted.id, "outbound", TENANT)


async def test_the_same_idempotency_key_gives_the_same_id_and_sends_once(hub_and_app: tuple[Any, Processor],
                                                                          fake_api: FakeApi) -> None:
    hub, _ = hub_and_app
    first = await hub.outbox.submit(TENANT, body(), idempotency_key="order-17-confirmation")
    again = await hub.outbox.submit(TENANT, body(parts=[{"type": "text", "text": "changed"}]),
                                    idempotency_key="order-17-confirmation")
    other = await hub.outbox.submit(TENANT, body(), idempotency_key="order-18-confirmation")
    assert (again.id, again.duplicate, first.duplicate) == (first.id, True, False)
    assert other.id != first.id
    await eventually(lambda: len(sends(fake_api)) == 2)
    texts = [item["text"] for item in sends(fake_api)]
    assert texts == ["hi", "hi"]


@pytest.mark.parametrize(("submitted", "key", "status", "code", "path"), [
    (b"{not json", "", 400, "invalid", "$"),
    (b"[1, 2]", "", 400, "invalid", "$"),
    (body(parts=[{"type": "text"}]), "", 400, "invalid", "$.parts[0]"),
    (body(kind="status"), "", 400, "invalid", "$.kind"),
    (body(tenant="other"), "", 400, "forbidden_tenant", "$.tenant"),
    (body(conversation={"connection": "tg-other", "native_id": CHAT}), "", 404, "not_found",
     "$.conversation.connection"),
    (body(conversation={"connection": "nowhere", "native_id": CHAT}), "", 404, "not_found",
     "$.conversation.connection"),
    (body(targets=[{"connection": "tg", "to": "1"}, {"connection": "tg-other", "to": "2"}]), "", 404, "not_found",
     "$.targets[1].connection"),
    (body(conversation={"id": "x" * 24, "connection": "tg", "native_id": CHAT}), "", 400, "conversation_mismatch",
     "$.conversation.id"),
    (body(conversation={}), "", 400, "invalid", "$.conversation"),
    (body(), "k" * (MAX_IDEMPOTENCY_KEY + 1), 400, "invalid_idempotency_key", ""),
    (body(), "line\nbreak", 400, "invalid_idempotency_key", ""),
])
async def test_what_is_refused_names_its_path_and_nothing_is_stored(
        hub_and_app: tuple[Any, Processor], submitted: bytes, key: str, status: int, code: str, path: str) -> None:
    hub, _ = hub_and_app
    with pytest.raises(Refusal) as refused:
        await hub.outbox.submit(TENANT, submitted, idempotency_key=key)
    assert (refused.value.status, refused.value.code, refused.value.path) == (status, code, path)
    assert refused.value.body() == {"error": {"code": code, "message": refused.value.message, "path": path}}
    stored = await stream_messages(hub.nc, f"{hub.subjects.prefix}.*.out.>", hub.subjects.stream_name("messages"))
    assert stored == []


async def test_origin_and_hops_travel_in_headers(hub_and_app: tuple[Any, Processor]) -> None:
    hub, _ = hub_and_app
    await hub.outbox.submit(TENANT, body(), origin="crm", hops=3)
    js = hub.nc.jetstream()
    subscription = await js.subscribe(f"{hub.subjects.prefix}.{TENANT}.out.>", ordered_consumer=True,
                                      stream=hub.subjects.stream_name("messages"))
    msg = await subscription.next_msg(timeout=5)
    await subscription.unsubscribe()
    assert msg.headers is not None and msg.headers[ORIGIN_HEADER] == "crm" and hops_of(msg.headers) == 3


async def test_a_message_past_the_hop_limit_is_stopped_kept_and_reported(hub_and_app: tuple[Any, Processor]) -> None:
    hub, _ = hub_and_app
    await hub.outbox.submit(TENANT, body(), origin="bot-a", hops=MAX_HOPS)
    with pytest.raises(Refusal) as refused:
        await hub.outbox.submit(TENANT, body(), origin="bot-b", hops=MAX_HOPS + 1)
    assert (refused.value.status, refused.value.code) == (508, "loop_detected")
    assert "processor 'bot-b'" in refused.value.message
    letters = dead_letters(await stream_messages(hub.nc, f"{hub.subjects.prefix}.{TENANT}.dlq.>",
                                                 hub.subjects.stream_name("dead_letters")))
    assert [letter["error"] for letter in letters] == [refused.value.message]
    assert c.decode(letters[0]["body"]).conversation.id == c.conversation_id(TENANT, "tg", CHAT)


# ------------------------------------------------------------------------------------------ routing


def inbound(connection: str = "tg", channel: str = "telegram", kind: str = "direct",
            parts: list[c.Part] | None = None) -> c.Message:
    return c.Message(id="m", tenant=TENANT, ts=c.now(), parts=parts or [c.Text(text="hi")],
                     conversation=c.Conversation(id="conv", connection=connection, channel=channel, type=kind))  # type: ignore[arg-type]


def test_a_route_matches_on_every_field_it_names() -> None:
    assert matches(cfg.Route(), inbound())
    assert matches(cfg.Route(connections=["tg"], channels=["telegram"], conversation_types=["direct"],
                             kinds=["message"], parts=["text"]), inbound())
    assert not matches(cfg.Route(connections=["wa"]), inbound())
    assert not matches(cfg.Route(channels=["slack"]), inbound())
    assert not matches(cfg.Route(conversation_types=["group"]), inbound())
    assert not matches(cfg.Route(kinds=["activity"]), inbound())
    assert not matches(cfg.Route(parts=["media"]), inbound())
    assert matches(cfg.Route(parts=["media"]), inbound(parts=[c.Text(text="see"), c.Media(media="image", url="https://x/y.png")]))
    typing = c.Activity(id="a", tenant=TENANT, ts=c.now(), activity="typing", conversation=c.Conversation(id="conv"))
    assert not matches(cfg.Route(parts=["text"]), typing)


def test_a_processor_gets_its_tenants_envelopes_on_any_route_and_never_its_own() -> None:
    everything = cfg.Processor(id="all", tenant=TENANT)
    groups = cfg.Processor(id="groups", tenant=TENANT, routes=[
        cfg.Route(conversation_types=["group"]), cfg.Route(connections=["vip"])])
    assert routed_to(everything, inbound())
    assert not routed_to(cfg.Processor(id="b", tenant="other"), inbound())
    assert not routed_to(groups, inbound())
    assert routed_to(groups, inbound(kind="group")) and routed_to(groups, inbound(connection="vip"))
    assert not routed_to(everything, inbound(), {ORIGIN_HEADER: "all"})
    assert routed_to(everything, inbound(), {ORIGIN_HEADER: "another"})


@pytest.mark.parametrize(("value", "hops"), [("", 0), ("2", 2), ("-1", 0), ("9999", 0), ("x", 0), ("٣", 0)])
def test_a_hop_count_a_client_wrote_cannot_be_negative_or_huge(value: str, hops: int) -> None:
    assert hops_of({HOPS_HEADER: value} if value else {}) == hops


@pytest.mark.parametrize(("route", "error"), [
    ('connections = ["tg-other"]', r"\$\.processors\[0\]\.routes\[0\]\.connections\[0\]: no connection 'tg-other'"),
    ('conversation_types = ["room"]', r"\$\.processors\[0\]\.routes\[0\]\.conversation_types\[0\]: 'room' is not"),
    ('parts = ["txt"]', r"\$\.processors\[0\]\.routes\[0\]\.parts\[0\]: 'txt' is not one of action, buttons"),
    ('kinds = ["status"]', r"Invalid enum value 'status'.*\$\.processors\[0\]\.routes\[0\]\.kinds\[0\]"),
])
def test_a_route_naming_what_the_tenant_does_not_have_is_refused_at_load(
        tmp_path: Any, route: str, error: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f'''
[[tenants]]
id = "acme"
[[tenants]]
id = "other"
[[connections]]
id = "tg-other"
tenant = "other"
channel = "telegram"
secrets = {{ bot_token = "1:x", secret_token = "s" }}
[[processors]]
id = "p"
tenant = "acme"
[[processors.routes]]
{route}
''')
    with pytest.raises(ConfigError, match=error):
        cfg.load(path, env={})


async def test_the_echo_processor_answers_only_what_its_routes_name(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    config = telegram_config(nats_server.url, fake_api.base_url)
    config = msgspec.structs.replace(config, processors=[
        cfg.Processor(id="echo", tenant=TENANT, transport="echo", routes=[cfg.Route(conversation_types=["group"])])])
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    url = hub.http_url + "/webhooks/telegram/tg"
    async with aiohttp.ClientSession() as session:
        direct = telegram_update(1, 7, "to nobody")
        group = telegram_update(2, -100, "to the echo")
        group["message"]["chat"]["type"] = "supergroup"
        for update in (direct, group):
            async with session.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as answer:
                assert answer.status == 200
    await app.next()
    await app.next()
    await eventually(lambda: sends(fake_api))
    assert [(str(item["chat_id"]), item["text"]) for item in sends(fake_api)] == [("-100", "echo: to the echo")]
    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.*.dlq.>",
                                                 hub.subjects.stream_name("dead_letters")))
    assert letters == []
