"""WhatsApp users with a username, through the hub: a message from a user whose phone number Meta
withholds (only the business-scoped user id, BSUID) reaches the processor, the reply reaches the user the
way Meta documents (`recipient`, not `to`), and the statuses of that reply land in the same conversation.
Webhooks for another phone number of the same business account are not taken as this connection's."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import TENANT, Processor, stream_messages, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
APP_SECRET = "wa-app-secret"
PHONE_NUMBER_ID = "106540352242922"
BSUID = "US.13491208655302741918"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi) -> AsyncIterator[Hub]:
    answer = json.loads(fixture("response_sent_to_bsuid.json"))

    def graph_api(request: Recorded) -> Reply:
        return Reply(body=answer)

    fake_api.responder = graph_api
    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[cfg.Connection(id="wa", tenant=TENANT, channel="whatsapp", api_base=fake_api.base_url,
                                    secrets={"access_token": "wa-token", "app_secret": APP_SECRET},
                                    options={"phone_number_id": PHONE_NUMBER_ID})],
    )
    async with Hub(config) as running:
        yield running


async def post(hub: Hub, body: bytes) -> int:
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
    async with aiohttp.ClientSession() as session, session.post(
        f"{hub.http_url}/webhooks/whatsapp/wa", data=body, headers=headers
    ) as response:
        return response.status


async def test_a_user_known_only_by_bsuid_is_answered_and_reported(  # type: ignore[no-untyped-def]
    hub: Hub, fake_api: FakeApi, nats_client
) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    assert await post(hub, fixture("text_username_only.json")) == 200
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.sender is not None
    assert inbound.conversation.native_id == BSUID and inbound.sender.handle == "@sheena_nelson"

    await app.reply(inbound, c.Text(text="Yes: blue and green."))
    sent = await app.next_status()
    assert sent.state == "sent", sent.error
    (request,) = fake_api.requests
    body = json.loads(request.body)
    assert body["recipient"] == BSUID and "to" not in body
    assert request.path == f"/{PHONE_NUMBER_ID}/messages"

    assert await post(hub, fixture("status_delivered_to_bsuid.json")) == 200
    delivered = await app.next_status()
    assert delivered.state == "delivered"
    assert delivered.conversation.id == inbound.conversation.id


async def test_a_webhook_for_another_number_of_the_account_is_not_delivered(  # type: ignore[no-untyped-def]
    hub: Hub, nats_client
) -> None:
    app = await Processor(nats_client, hub.subjects.prefix).start()
    other_number = json.loads(fixture("text.json"))
    other_number["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "106540352242933"
    assert await post(hub, json.dumps(other_number).encode()) == 200  # signed by Meta: accepted, then refused
    # The next delivery (for this number) is the first the processor sees.
    assert await post(hub, fixture("batch_two_numbers.json")) == 200
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.conversation.native_id == "16505551234"
    assert app.inbound.empty()
    subjects = hub.subjects
    letters = await stream_messages(nats_client, f"{subjects.prefix}.{TENANT}.dlq.>",
                                    subjects.stream_name("dead_letters"))
    assert len(letters) == 1 and b"106540352242933" in letters[0]
