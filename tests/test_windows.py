"""Messaging windows on a real nats-server, hub and a local fake WhatsApp Cloud API: inside the 24 hours
after the user's last message a free-form reply goes as it is; after, it is replaced by the template the
conversation or the connection names, or fails at once with `outside_window`. Time is the hub's clock
(`HubContext.clock`), moved by the test."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.actors.conversation import OUTSIDE_WINDOW, WINDOW_TEMPLATE_META
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import TENANT, Processor, StartHub, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
APP_SECRET = "wa-app"
DAY = 24 * 3600.0


def whatsapp_config(nats_url: str, api_base: str, **options: Any) -> cfg.Config:
    connection = cfg.Connection(id="wa", tenant=TENANT, channel="whatsapp", api_base=api_base,
                                secrets={"access_token": "wa-token", "app_secret": APP_SECRET},
                                options={"phone_number_id": "106540352242922", **options})
    return cfg.Config(hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
                      tenants=[cfg.Tenant(id=TENANT)], connections=[connection])


def sent_ok(_: Recorded) -> Reply:
    return Reply(body=json.loads((FIXTURES / "response_sent.json").read_text()))


async def user_writes(hub: Hub, app: Processor, wamid: str = "") -> c.Envelope:
    """The user's text message arrives by the signed webhook (as another message when `wamid` is given);
    the app gets it."""
    document = json.loads((FIXTURES / "text.json").read_text())
    if wamid:
        document["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = wamid
    body = json.dumps(document).encode()
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with aiohttp.ClientSession() as session, session.post(
            f"{hub.http_url}/webhooks/whatsapp/wa", data=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature}) as response:
        assert response.status == 200
    inbound, _ = await app.next()
    return inbound


async def outcome(app: Processor, message: c.Message) -> c.Status:
    while True:
        status = await app.next_status()
        if status.message_id == message.id:
            return status


def later(hub: Hub, seconds: float) -> None:
    hub.ctx.clock = lambda: time.time() + seconds


def posted(api: FakeApi) -> list[dict[str, Any]]:
    return [call.json() for call in api.requests if call.path.endswith("/messages")]


@pytest.fixture
async def whatsapp(nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi,
                   start_hub: StartHub) -> tuple[Hub, Processor]:
    fake_api.responder = sent_ok
    hub = await start_hub(whatsapp_config(nats_server.url, fake_api.base_url))
    return hub, await Processor(nats_client, hub.subjects.prefix).start()


async def test_inside_the_window_a_free_form_reply_goes_as_it_is(
        whatsapp: tuple[Hub, Processor], fake_api: FakeApi) -> None:
    hub, app = whatsapp
    inbound = await user_writes(hub, app)
    later(hub, DAY - 60)
    reply = await app.reply(inbound, c.Text(text="still within the day"))
    assert (await outcome(app, reply)).state == "sent"
    assert [(body["type"], body["text"]["body"]) for body in posted(fake_api)] == [("text", "still within the day")]


async def test_outside_the_window_without_a_template_it_fails_at_once_saying_how_to_fix_it(
        whatsapp: tuple[Hub, Processor], fake_api: FakeApi) -> None:
    hub, app = whatsapp
    inbound = await user_writes(hub, app)
    later(hub, DAY + 60)
    reply = await app.reply(inbound, c.Text(text="too late"))
    status = await outcome(app, reply)
    assert status.state == "failed" and status.error is not None and status.error.code == OUTSIDE_WINDOW
    assert "closed at" in status.error.message and "options.window_template" in status.error.message
    assert posted(fake_api) == []  # no channel call, no channel error to decode
    template = await app.reply(inbound, c.Template(name="order_update", language="en_US", params={"1": "17"}))
    assert (await outcome(app, template)).state == "sent"  # a template part of its own goes at any time
    assert [body["type"] for body in posted(fake_api)] == ["template"]


async def test_outside_the_window_the_connection_s_template_is_sent_instead(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = sent_ok
    hub = await start_hub(whatsapp_config(nats_server.url, fake_api.base_url, window_template={
        "name": "reopen_conversation", "language": "en_US", "params": {"1": "Ada"}}))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    inbound = await user_writes(hub, app)
    later(hub, 2 * DAY)
    reply = await app.reply(inbound, c.Text(text="free-form"))
    assert (await outcome(app, reply)).state == "sent"
    [body] = posted(fake_api)
    assert body["type"] == "template"
    assert body["template"] == {"name": "reopen_conversation", "language": {"code": "en_US"},
                                "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ada"}]}]}


async def test_a_template_the_app_names_in_meta_is_kept_for_the_conversation(
        whatsapp: tuple[Hub, Processor], fake_api: FakeApi) -> None:
    hub, app = whatsapp
    inbound = await user_writes(hub, app)
    named = {"name": "follow_up", "language": "pt_BR", "params": {"nome": "Ada"}}
    first = await app.reply(inbound, c.Text(text="inside"), meta={WINDOW_TEMPLATE_META: named})
    assert (await outcome(app, first)).state == "sent"
    later(hub, DAY + 1)
    second = await app.reply(inbound, c.Text(text="outside, no meta"))
    assert (await outcome(app, second)).state == "sent"
    bodies = posted(fake_api)
    assert [body["type"] for body in bodies] == ["text", "template"]
    assert bodies[1]["template"]["name"] == "follow_up"
    assert bodies[1]["template"]["components"][0]["parameters"] == [
        {"type": "text", "parameter_name": "nome", "text": "Ada"}]


@pytest.mark.parametrize(("named", "reason"), [
    ({"language": "en"}, "name"),
    ("order_update", "Expected `object`"),
    ({"name": "big", "params": {str(n): "y" * 50 for n in range(40)}}, "larger than 1024 bytes"),
])
async def test_an_unreadable_template_in_meta_fails_the_message_with_its_reason(
        whatsapp: tuple[Hub, Processor], fake_api: FakeApi, named: Any, reason: str) -> None:
    hub, app = whatsapp
    inbound = await user_writes(hub, app)
    reply = await app.reply(inbound, c.Text(text="x"), meta={WINDOW_TEMPLATE_META: named})
    status = await outcome(app, reply)
    assert status.state == "failed" and status.error is not None
    assert status.error.code == "invalid_window_template" and reason in status.error.message
    assert posted(fake_api) == []
    fine = await app.reply(inbound, c.Text(text="y"))
    assert (await outcome(app, fine)).state == "sent"  # the conversation carries on


def test_a_misspelt_window_template_is_refused_when_the_config_is_read(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('''
[[tenants]]
id = "acme"
[[connections]]
id = "wa"
tenant = "acme"
channel = "whatsapp"
secrets = { access_token = "t", app_secret = "s" }
options = { phone_number_id = "1", window_template = { nme = "x" } }
''')
    with pytest.raises(ConfigError, match=r"options\.window_template"):
        cfg.load(path, env={})
