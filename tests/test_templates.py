"""Stored templates (`babelhub.services.templates`, the `templates` API): rendering as a pure function,
then on real parts — a real nats-server, the hub in-process, local fakes of the WhatsApp Cloud API and
the Telegram Bot API — the same stored template sent through `POST /v1/messages` to WhatsApp (the approved
template message, `tests/fixtures/whatsapp/send_template_*.json` shapes), to Telegram (the rendered text)
and to both at once with `targets`; CRUD, validation with JSON paths, and isolation between tenants."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.actors import conversation
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.templates import (
    RENDERED_META,
    WINDOW_TEMPLATE_META,
    NewTemplate,
    Template,
    TemplateError,
    TemplateFields,
    check,
    for_connection,
    placeholders,
    render,
)
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import Processor, StartHub, telegram_responder, unique_prefix

WHATSAPP = cfg.channel_codec("whatsapp").capabilities.template_format
TELEGRAM = cfg.channel_codec("telegram").capabilities.template_format  # none: gets the text

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
APP_SECRET = "wa-app-secret"
ACME, OTHER = "acme", "other"
KEYS = {ACME: "acme-template-key", OTHER: "other-template-key"}
WA_CHAT, TG_CHAT = "16505551234", "4242"
BOT_TOKEN = "123456:TEMPLATES-token"

ORDER_SHIPPED: dict[str, Any] = {
    "name": "order_shipped",
    "description": "Tells a customer their order left the warehouse",
    "variables": ["customer_name", "order_number"],
    "versions": {
        "en_US": {"text": "Hi {{customer_name}}, order {{ order_number }} has shipped.",
                  "whatsapp": {"name": "order_confirmation", "language": "en_US",
                               "components": {"body": ["customer_name", "order_number"]}}},
        "pt_BR": {"text": "Olá {{customer_name}}, o pedido {{order_number}} foi enviado.", "active": False},
        "fr": {"text": "Bonjour {{customer_name}}, la commande {{order_number}} est partie."},
    },
}


def stored(document: dict[str, Any] = ORDER_SHIPPED) -> Template:
    new = msgspec.convert(document, NewTemplate)
    check(new)
    return Template(name=new.name, description=new.description, variables=new.variables, versions=new.versions)


def part(language: str = "", **params: str) -> c.Template:
    return c.Template(name="order_shipped", language=language, params=params)


VALUES = {"customer_name": "Jessica", "order_number": "SKBUP2-4CPIG9"}


# ------------------------------------------------------------------------------------------ pure rendering

def test_whatsapp_gets_the_approved_template_and_its_body_parameters_in_order() -> None:
    rendered = render(stored(), part("en_US", **VALUES), WHATSAPP, "$.parts[0]")
    assert rendered == c.Template(name="order_confirmation", language="en_US",
                                  params={"1": "Jessica", "2": "SKBUP2-4CPIG9"})


def test_named_parameters_and_the_header_are_keyed_as_the_codec_sends_them() -> None:
    document = {**ORDER_SHIPPED, "variables": ["customer_name", "order_number", "sale_start_date"], "versions": {
        "en_US": {"text": "{{sale_start_date}}: hi {{customer_name}}, {{order_number}}",
                  "whatsapp": {"name": "seasonal_sale", "language": "en_US", "parameter_format": "named",
                               "components": {"header": ["sale_start_date"],
                                              "body": ["customer_name", "order_number"]}}}}}
    rendered = render(stored(document), part(**VALUES, sale_start_date="December 1st"), WHATSAPP, "$")
    assert rendered == c.Template(name="seasonal_sale", language="en_US", params={
        "header.sale_start_date": "December 1st", "customer_name": "Jessica", "order_number": "SKBUP2-4CPIG9"})


def test_other_channels_and_versions_without_a_whatsapp_template_get_the_text() -> None:
    assert render(stored(), part("en_US", **VALUES), TELEGRAM, "$") == c.Text(
        text="Hi Jessica, order SKBUP2-4CPIG9 has shipped.")
    assert render(stored(), part("fr", **VALUES), WHATSAPP, "$") == c.Text(
        text="Bonjour Jessica, la commande SKBUP2-4CPIG9 est partie.")


def test_without_a_language_the_first_active_version_is_used() -> None:
    document = {**ORDER_SHIPPED, "versions": {"pt_BR": ORDER_SHIPPED["versions"]["pt_BR"],
                                              "fr": ORDER_SHIPPED["versions"]["fr"]}}
    assert render(stored(document), part(**VALUES), TELEGRAM, "$") == c.Text(
        text="Bonjour Jessica, la commande SKBUP2-4CPIG9 est partie.")


@pytest.mark.parametrize(("language", "params", "code", "path"), [
    ("en_US", {"customer_name": "Jessica"}, "missing_variable", "$.parts[2].params.order_number"),
    ("en_US", {**VALUES, "coupon": "X"}, "unknown_variable", "$.parts[2].params.coupon"),
    ("en_US", {**VALUES, "a.*": "X"}, "unknown_variable", "$.parts[2].params.(key)"),
    ("en_US", {**VALUES, "order_number": "9" * 1025}, "invalid", "$.parts[2].params.order_number"),
    ("pt_BR", VALUES, "inactive_version", "$.parts[2].language"),
    ("de", VALUES, "unknown_language", "$.parts[2].language"),
])
def test_what_cannot_be_rendered_is_refused_naming_the_path(language: str, params: dict[str, str], code: str,
                                                            path: str) -> None:
    with pytest.raises(TemplateError) as refused:
        render(stored(), part(language, **params), WHATSAPP, "$.parts[2]")
    assert (refused.value.code, refused.value.path) == (code, path)


def test_a_template_with_every_version_inactive_is_refused() -> None:
    document = {**ORDER_SHIPPED, "versions": {"pt_BR": ORDER_SHIPPED["versions"]["pt_BR"]}}
    with pytest.raises(TemplateError, match="no active version") as refused:
        render(stored(document), part(**VALUES), TELEGRAM, "$.parts[0]")
    assert refused.value.path == "$.parts[0].language"


@given(st.text(max_size=200))
def test_a_value_is_never_read_as_a_placeholder(value: str) -> None:
    template = stored({"name": "t", "variables": ["a", "b"], "versions": {"en": {"text": "<{{a}}|{{b}}>"}}})
    rendered = render(template, c.Template(name="t", params={"a": value, "b": "{{a}}"}), TELEGRAM, "$")
    assert rendered == c.Text(text=f"<{value}|{{{{a}}}}>")


@pytest.mark.parametrize("text", ["Hi {{name", "Hi name}}", "{{{{name}}", "{{ na me }}", "{{*}}", "{{>}}",
                                  "{{1}}", "{{Name}}", "{{header.1}}", "{{}}"])
def test_malformed_placeholders_are_refused(text: str) -> None:
    with pytest.raises(TemplateError) as refused:
        placeholders(text, "$.versions.en.text")
    assert (refused.value.code, refused.value.path) == ("invalid_placeholder", "$.versions.en.text")


def test_placeholders_and_mapped_parameters_must_be_declared() -> None:
    with pytest.raises(TemplateError) as undeclared:
        check(msgspec.convert({"variables": ["a"], "versions": {"en": {"text": "{{a}} {{b}}"}}}, TemplateFields))
    assert (undeclared.value.code, undeclared.value.path) == ("undeclared_variable", "$.versions.en.text")
    mapped = {"variables": ["a"], "versions": {"en": {"text": "{{a}}", "whatsapp": {
        "name": "t", "language": "en", "components": {"body": ["a", "b"]}}}}}
    with pytest.raises(TemplateError) as unmapped:
        check(msgspec.convert(mapped, TemplateFields))
    assert unmapped.value.path == "$.versions.en.whatsapp.components.body[1]"
    with pytest.raises(TemplateError) as twice:
        check(msgspec.convert({"variables": ["a", "a"], "versions": {"en": {"text": "x"}}}, TemplateFields))
    assert twice.value.path == "$.variables[1]"


def test_a_fan_out_copy_takes_the_parts_rendered_for_its_connection() -> None:
    text = c.Text(text="Hi")
    template = c.Template(name="order_confirmation", language="en_US", params={"1": "x"})
    message = c.Message(id="m", tenant=ACME, ts=c.now(), conversation=c.Conversation(id="x"), parts=[text],
                        meta={"app.key": 1, RENDERED_META: {"wa": msgspec.to_builtins([template])}})
    assert for_connection(message, "wa").parts == [template]
    assert for_connection(message, "tg").parts == [text]
    assert for_connection(message, "wa").meta == {"app.key": 1}


# ------------------------------------------------------------------------------------------ on a hub

def responder(request: Recorded) -> Reply:
    """WhatsApp's documented send answer for the Cloud API, the sent Message for the Bot API."""
    if request.path.startswith("/whatsapp/"):
        return Reply(body={"messaging_product": "whatsapp", "contacts": [{"input": WA_CHAT, "wa_id": WA_CHAT}],
                           "messages": [{"id": f"wamid.HBgLMTY1MDU1NTEyMzQVAgARGBI{len(request.body):X}"}]})
    return telegram_responder(request)


def config(nats_url: str, api_base: str) -> cfg.Config:
    def whatsapp(connection: str, tenant: str) -> cfg.Connection:
        return cfg.Connection(id=connection, tenant=tenant, channel="whatsapp", api_base=f"{api_base}/whatsapp",
                              secrets={"access_token": f"{tenant}-wa-token", "app_secret": APP_SECRET},
                              options={"phone_number_id": "106540352242922"})

    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=tenant, api_keys=[key]) for tenant, key in KEYS.items()],
        connections=[whatsapp("wa", ACME), whatsapp("wa-other", OTHER),
                     cfg.Connection(id="tg", tenant=ACME, channel="telegram", api_base=api_base,
                                    secrets={"bot_token": BOT_TOKEN, "secret_token": "tg-secret"})])


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    fake_api.responder = responder
    return await start_hub(config(nats_server.url, fake_api.base_url))


async def call(http: aiohttp.ClientSession, hub: Hub, method: str, path: str, body: Any = None, *,
               key: str = KEYS[ACME]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else msgspec.json.encode(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.request(method, hub.http_url + path, data=data, headers=headers) as response:
        return response.status, (await response.json() if response.status != 204 else None)


def sends(api: FakeApi, suffix: str) -> list[dict[str, Any]]:
    return [request.json() for request in api.requests if request.path.endswith(suffix)]


async def sent(api: FakeApi, suffix: str, count: int = 1) -> list[dict[str, Any]]:
    for _ in range(750):
        if len(found := sends(api, suffix)) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} call(s) to …{suffix} never came: {[r.path for r in api.requests]}")


def template_message(conversation: dict[str, str], language: str = "en_US", **fields: Any) -> dict[str, Any]:
    return {"conversation": conversation,
            "parts": [{"type": "template", "name": "order_shipped", "language": language, "params": VALUES}],
            **fields}


WA = {"connection": "wa", "native_id": WA_CHAT}
TG = {"connection": "tg", "native_id": TG_CHAT}
APPROVED = {"name": "order_confirmation", "language": {"code": "en_US"}, "components": [
    {"type": "body", "parameters": [{"type": "text", "text": "Jessica"}, {"type": "text", "text": "SKBUP2-4CPIG9"}]}]}


async def test_one_stored_template_is_sent_as_each_channel_takes_it(hub: Hub, http: aiohttp.ClientSession,
                                                                    fake_api: FakeApi) -> None:
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    status, answer = await call(http, hub, "POST", "/v1/messages", template_message(WA))
    assert status == 202, answer
    (whatsapp,) = await sent(fake_api, "/messages")
    assert whatsapp == {"messaging_product": "whatsapp", "recipient_type": "individual", "to": WA_CHAT,
                        "type": "template", "template": APPROVED}
    assert (await call(http, hub, "POST", "/v1/messages", template_message(TG)))[0] == 202
    (telegram,) = await sent(fake_api, "/sendMessage")
    assert (telegram["chat_id"], telegram["text"]) == (int(TG_CHAT), "Hi Jessica, order SKBUP2-4CPIG9 has shipped.")


def on_nats(connection: str, channel: str, chat: str, *parts: c.Part) -> c.Message:
    """An outbound message as an app publishes it on NATS itself."""
    return c.Message(id=c.new_id(), tenant=ACME, ts=c.now(), direction="outbound", parts=list(parts),
                     conversation=c.Conversation(id=c.conversation_id(ACME, connection, chat), channel=channel,
                                                 connection=connection, native_id=chat))


async def test_a_message_an_app_publishes_on_nats_is_rendered_by_the_hub(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi, nats_client: NATS) -> None:
    """The default transport: the app publishes on `out` itself, and the conversation actor renders."""
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    app = await Processor(nats_client, hub.subjects.prefix, ACME).start()
    for connection, channel, chat in (("wa", "whatsapp", WA_CHAT), ("tg", "telegram", TG_CHAT)):
        await app.send(on_nats(connection, channel, chat, part("en_US", **VALUES)))
    (whatsapp,) = await sent(fake_api, "/messages")
    assert whatsapp["type"] == "template" and whatsapp["template"] == APPROVED
    (telegram,) = await sent(fake_api, "/sendMessage")
    assert telegram["text"] == "Hi Jessica, order SKBUP2-4CPIG9 has shipped."

    missing = on_nats("tg", "telegram", TG_CHAT, part("en_US", customer_name="Jessica"))
    await app.send(missing)
    status = await app.next_status()
    while status.message_id != missing.id:
        status = await app.next_status()
    assert status.state == "failed" and status.error is not None
    assert status.error.code == "missing_variable"
    assert status.error.message.startswith("$.parts[0].params.order_number: ")
    assert len(sends(fake_api, "/sendMessage")) == 1


async def test_a_template_is_rendered_once_though_its_approved_name_is_a_stored_one(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    """The outbox's rendering is final: the approved template it produced is not taken for a stored one."""
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    homonym = {"name": "order_confirmation", "variables": [], "versions": {"en_US": {"text": "not this one"}}}
    assert (await call(http, hub, "POST", "/v1/templates", homonym))[0] == 201
    assert (await call(http, hub, "POST", "/v1/messages", template_message(WA)))[0] == 202
    (whatsapp,) = await sent(fake_api, "/messages")
    assert whatsapp["type"] == "template" and whatsapp["template"] == APPROVED


async def test_targets_on_two_channels_each_get_their_rendering(hub: Hub, http: aiohttp.ClientSession,
                                                                fake_api: FakeApi) -> None:
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    targets = [{"connection": "wa", "to": WA_CHAT}, {"connection": "tg", "to": TG_CHAT}]
    status, answer = await call(http, hub, "POST", "/v1/messages", template_message(TG, targets=targets))
    assert status == 202, answer
    (whatsapp,) = await sent(fake_api, "/messages")
    (telegram,) = await sent(fake_api, "/sendMessage")
    assert whatsapp["type"] == "template" and whatsapp["template"] == APPROVED
    assert telegram["text"] == "Hi Jessica, order SKBUP2-4CPIG9 has shipped."


async def test_a_message_that_cannot_be_rendered_is_refused_with_the_path(hub: Hub, http: aiohttp.ClientSession,
                                                                          fake_api: FakeApi) -> None:
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    missing = template_message(WA)
    missing["parts"][0]["params"] = {"customer_name": "Jessica"}
    status, answer = await call(http, hub, "POST", "/v1/messages", missing)
    assert (status, answer["error"]["code"], answer["error"]["path"]) == (
        400, "missing_variable", "$.parts[0].params.order_number")
    assert "order_number" in answer["error"]["message"]
    status, answer = await call(http, hub, "POST", "/v1/messages", template_message(WA, "pt_BR"))
    assert (status, answer["error"]["code"], answer["error"]["path"]) == (
        400, "inactive_version", "$.parts[0].language")
    many = template_message(WA)
    many["parts"] = [{"type": "template", "name": f"t{index}", "params": {}} for index in range(17)]
    status, answer = await call(http, hub, "POST", "/v1/messages", many)
    assert (status, answer["error"]["path"]) == (400, "$.parts")
    by_id = template_message({"id": c.conversation_id(ACME, "wa", WA_CHAT)})
    status, answer = await call(http, hub, "POST", "/v1/messages", by_id)
    assert (status, answer["error"]["path"]) == (400, "$.conversation.connection")
    await asyncio.sleep(0.2)
    assert fake_api.requests == []


async def test_templates_are_stored_changed_and_deleted_with_an_audit_trail(hub: Hub,
                                                                            http: aiohttp.ClientSession) -> None:
    status, created = await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED)
    assert status == 201 and created["name"] == "order_shipped" and created["created_at"]
    status, answer = await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED)
    assert (status, answer["error"]["code"]) == (409, "exists")
    changed = {key: value for key, value in ORDER_SHIPPED.items() if key != "name"}
    changed["versions"] = {"en_US": {**ORDER_SHIPPED["versions"]["en_US"], "active": False}}
    status, replaced = await call(http, hub, "PUT", "/v1/templates/order_shipped", changed)
    assert status == 200 and list(replaced["versions"]) == ["en_US"]
    assert replaced["created_at"] == created["created_at"]
    status, listed = await call(http, hub, "GET", "/v1/templates")
    assert status == 200 and [item["name"] for item in listed["data"]] == ["order_shipped"]
    status, answer = await call(http, hub, "PUT", "/v1/templates/order_shipped", {**replaced, "name": "renamed"})
    assert (status, answer["error"]["path"]) == (400, "$.name")
    status, answer = await call(http, hub, "PUT", "/v1/templates/order_shipped", {**replaced, "descripton": "typo"})
    assert (status, answer["error"]["code"]) == (400, "invalid") and "descripton" in answer["error"]["message"]
    status, again = await call(http, hub, "PUT", "/v1/templates/order_shipped", replaced)  # as GET answered it
    assert status == 200 and again["versions"] == replaced["versions"]
    status, preview = await call(http, hub, "POST", "/v1/templates/order_shipped/render",
                                 {"channel": "telegram", "language": "en_US", "params": VALUES})
    assert (status, preview["error"]["code"]) == (400, "inactive_version")
    assert (await call(http, hub, "DELETE", "/v1/templates/order_shipped"))[0] == 204
    assert (await call(http, hub, "GET", "/v1/templates/order_shipped"))[0] == 404
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201  # the name is free again
    events, _ = await hub.services.audit.read(ACME)
    assert [(event.action, event.target) for event in events] == [
        ("template.create", "order_shipped"), ("template.update", "order_shipped"),
        ("template.update", "order_shipped"), ("template.delete", "order_shipped"),
        ("template.create", "order_shipped")]
    assert events[1].changes["active"] == "" and events[0].changes["languages"] == "en_US, pt_BR, fr"


async def test_a_preview_renders_for_the_channel_named(hub: Hub, http: aiohttp.ClientSession) -> None:
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    status, preview = await call(http, hub, "POST", "/v1/templates/order_shipped/render",
                                 {"channel": "whatsapp", "params": VALUES})
    assert status == 200 and preview["part"] == {"type": "template", "name": "order_confirmation",
                                                 "language": "en_US", "params": {"1": "Jessica",
                                                                                 "2": "SKBUP2-4CPIG9"}}
    status, preview = await call(http, hub, "POST", "/v1/templates/order_shipped/render",
                                 {"channel": "telegram", "params": {"customer_name": "Ada"}})
    assert (status, preview["error"]["path"]) == (400, "$.params.order_number")
    status, preview = await call(http, hub, "POST", "/v1/templates/order_shipped/render",
                                 {"channel": "no_such_channel", "params": VALUES})
    assert (status, preview["error"]["path"]) == (400, "$.channel")


async def test_a_read_key_reads_but_does_not_change(hub: Hub, http: aiohttp.ClientSession) -> None:
    _, reader = await hub.services.keys.create(ACME, ["read"])
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED, key=reader))[0] == 403
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    assert (await call(http, hub, "GET", "/v1/templates/order_shipped", key=reader))[0] == 200
    assert (await call(http, hub, "DELETE", "/v1/templates/order_shipped", key=reader))[0] == 403


@pytest.mark.parametrize(("change", "code", "path"), [
    ({"name": "orders.*"}, "invalid", "$.name"),
    ({"name": ">"}, "invalid", "$.name"),
    ({"name": "a" * 65}, "invalid", "$.name"),
    ({"variables": ["Customer Name"]}, "invalid", "$.variables[0]"),
    ({"versions": {}}, "invalid", "$.versions"),
    ({"versions": {"en*": {"text": "x"}}}, "invalid", "$.versions"),
    ({"versions": {"en": {"text": "x" * 4097}}}, "invalid", "$.versions[...].text"),
    ({"versions": {"en": {"text": "Hi {{customer_name"}}}, "invalid_placeholder", "$.versions.en.text"),
    ({"versions": {"en": {"text": "Hi {{coupon}}"}}}, "undeclared_variable", "$.versions.en.text"),
    ({"versions": {"en": {"text": "x", "whatsapp": {"name": "Bad Name", "language": "en"}}}}, "invalid",
     "$.versions[...].whatsapp.name"),
    ({"versions": {"en": {"text": "x", "whatsapp": {"name": "t", "language": "en", "components": {
        "header": ["customer_name", "order_number"]}}}}}, "invalid", "$.versions[...].whatsapp.components.header"),
    ({"surprise": 1}, "invalid", "$"),
])
async def test_what_cannot_be_stored_is_refused_naming_the_path(hub: Hub, http: aiohttp.ClientSession,
                                                                change: dict[str, Any], code: str,
                                                                path: str) -> None:
    status, answer = await call(http, hub, "POST", "/v1/templates", {**ORDER_SHIPPED, **change})
    assert (status, answer["error"]["code"], answer["error"]["path"]) == (400, code, path), answer
    assert (await call(http, hub, "GET", "/v1/templates"))[1] == {"data": []}


async def test_a_huge_template_is_refused_before_it_is_read(hub: Hub, http: aiohttp.ClientSession) -> None:
    versions = {f"l{index:03d}"[:3]: {"text": "x" * 4096} for index in range(40)}
    huge = {**ORDER_SHIPPED, "description": "d" * 10_000_000, "versions": versions}
    status, answer = await call(http, hub, "POST", "/v1/templates", huge)
    assert (status, answer["error"]["code"]) == (413, "too_large")


async def test_another_tenants_template_does_not_exist(hub: Hub, http: aiohttp.ClientSession,
                                                       fake_api: FakeApi) -> None:
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    for method, path, body in [("GET", "/v1/templates/order_shipped", None),
                               ("PUT", "/v1/templates/order_shipped", {"versions": {"en": {"text": "x"}}}),
                               ("DELETE", "/v1/templates/order_shipped", None),
                               ("POST", "/v1/templates/order_shipped/render", {"channel": "telegram"}),
                               ("GET", "/v1/templates/never_made", None)]:
        status, answer = await call(http, hub, method, path, body, key=KEYS[OTHER])
        assert (status, answer["error"]["code"], answer["error"]["path"]) == (404, "not_found", "name"), path
    assert (await call(http, hub, "GET", "/v1/templates", key=KEYS[OTHER]))[1] == {"data": []}
    theirs = {**ORDER_SHIPPED, "name": "theirs"}
    assert (await call(http, hub, "POST", "/v1/templates", theirs, key=KEYS[OTHER]))[0] == 201
    for tenant, names in ((ACME, ["order_shipped"]), (OTHER, ["theirs"])):
        listed = (await call(http, hub, "GET", "/v1/templates", key=KEYS[tenant]))[1]
        assert [item["name"] for item in listed["data"]] == names
    # Naming acme's template in a message of `other` renders nothing: the part goes out as it was written.
    status, _ = await call(http, hub, "POST", "/v1/messages", template_message({"connection": "wa-other",
                                                                                "native_id": WA_CHAT}), key=KEYS[OTHER])
    assert status == 202
    (raw,) = await sent(fake_api, "/messages")
    assert raw["template"]["name"] == "order_shipped"
    assert (await call(http, hub, "GET", "/v1/templates/order_shipped"))[0] == 200


async def test_a_stored_template_can_stand_in_outside_the_whatsapp_window(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi, nats_client: NATS) -> None:
    assert conversation.WINDOW_TEMPLATE_META == WINDOW_TEMPLATE_META  # the meta the actor reads
    assert (await call(http, hub, "POST", "/v1/templates", ORDER_SHIPPED))[0] == 201
    app = await Processor(nats_client, hub.subjects.prefix, ACME).start()
    body = (FIXTURES / "text.json").read_bytes()  # the user (16505551234) writes: the window opens
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with http.post(f"{hub.http_url}/webhooks/whatsapp/wa", data=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": signature}) as response:
        assert response.status == 200
    await app.next()
    hub.ctx.clock = lambda: time.time() + 2 * 24 * 3600  # two days later: closed
    named = {"name": "order_shipped", "language": "fr", "params": VALUES}
    status, answer = await call(http, hub, "POST", "/v1/messages", {
        "conversation": WA, "parts": [{"type": "text", "text": "free-form"}], "meta": {WINDOW_TEMPLATE_META: named}})
    assert (status, answer["error"]["code"], answer["error"]["path"]) == (
        400, "invalid_window_template", '$.meta["babelhub.window_template"].language')  # fr has no approved one
    named["language"] = "en_US"
    status, answer = await call(http, hub, "POST", "/v1/messages", {
        "conversation": WA, "parts": [{"type": "text", "text": "free-form"}], "meta": {WINDOW_TEMPLATE_META: named}})
    assert status == 202, answer
    (whatsapp,) = await sent(fake_api, "/messages")
    assert whatsapp["type"] == "template" and whatsapp["template"] == APPROVED
    # Telegram has no approved templates: naming one for its window is refused, not sent as text.
    status, answer = await call(http, hub, "POST", "/v1/messages", {
        "conversation": TG, "parts": [{"type": "text", "text": "free-form"}], "meta": {WINDOW_TEMPLATE_META: named}})
    assert (status, answer["error"]["code"], answer["error"]["path"]) == (
        400, "invalid_window_template", '$.meta["babelhub.window_template"]')


async def test_a_name_that_cannot_be_a_template_is_refused_in_the_url(hub: Hub, http: aiohttp.ClientSession) -> None:
    for name in ("orders.*", "%3E", "a%20b", "A", "x" * 65):
        for method in ("GET", "DELETE"):
            status, answer = await call(http, hub, method, f"/v1/templates/{name}")
            assert (status, answer["error"]["path"]) == (400, "name"), (method, name)


async def test_two_changes_from_the_same_read_do_not_overwrite_each_other(hub: Hub) -> None:
    assert hub.ctx.renderer is not None
    templates = hub.ctx.renderer.templates
    await templates.create(ACME, msgspec.convert(ORDER_SHIPPED, NewTemplate))
    changes = [msgspec.convert({"description": f"change {n}", "variables": [], "versions": {"en": {"text": "x"}}},
                               TemplateFields) for n in range(2)]
    outcomes = await asyncio.gather(*(templates.replace(ACME, "order_shipped", change) for change in changes),
                                    return_exceptions=True)
    refused = [outcome for outcome in outcomes if isinstance(outcome, TemplateError)]
    assert [(error.status, error.code) for error in refused] == [(409, "conflict")], outcomes
    kept = await templates.get(ACME, "order_shipped")
    assert kept is not None and kept in outcomes
