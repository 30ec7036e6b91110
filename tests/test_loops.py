"""Loop prevention on the paths the Outbox does not see (issue 11 §5), on a real nats-server, hub and a
local fake Bot API: a processor's message published straight on NATS carries its hop count
(`Babelhub-Hops`), and past `routing.MAX_HOPS` the conversation actor refuses it, keeps it as a dead
letter and reports it `failed` (`loop_detected`) instead of sending it."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.routing import HOPS_HEADER, MAX_HOPS
from tests.fakeapi import FakeApi
from tests.hubkit import (
    TENANT,
    Processor,
    StartHub,
    dead_letters,
    stream_messages,
    telegram_config,
    telegram_responder,
)

CHAT = "4242"


def message(text: str) -> c.Message:
    conversation = c.Conversation(id=c.conversation_id(TENANT, "tg", CHAT), channel="telegram", connection="tg",
                                  native_id=CHAT)
    return c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                     parts=[c.Text(text=text)])


def texts(api: FakeApi) -> list[str]:
    return [call.json()["text"] for call in api.requests if call.path.endswith("/sendMessage")]


@pytest.fixture
def config(nats_server: EmbeddedServer, fake_api: FakeApi) -> cfg.Config:
    fake_api.responder = telegram_responder
    return telegram_config(nats_server.url, fake_api.base_url)


async def next_status_of(app: Processor, message_id: str) -> c.Status:
    while True:
        status = await app.next_status()
        if status.message_id == message_id:
            return status


async def test_a_message_published_on_nats_past_max_hops_is_refused_and_kept(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    looping = message("round and round")
    await app.send(looping, headers={HOPS_HEADER: str(MAX_HOPS + 1)})
    refused = await next_status_of(app, looping.id)
    assert refused.state == "failed" and refused.error is not None
    assert refused.error.code == "loop_detected" and f"{MAX_HOPS + 1} processor round trips" in refused.error.message

    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.>",
                                                 hub.subjects.stream_name("dead_letters")))
    assert [letter["stage"] for letter in letters] == ["processor"]
    assert "loop_detected" in letters[0]["error"]
    assert c.decode(letters[0]["body"]).id == looping.id

    last_allowed = message("one more relay is fine")
    await app.send(last_allowed, headers={HOPS_HEADER: str(MAX_HOPS)})
    assert (await next_status_of(app, last_allowed.id)).state == "sent"
    assert texts(fake_api) == ["one more relay is fine"]
