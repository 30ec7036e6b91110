"""Delivery guarantees on a real nats-server, hub and local fake channel APIs: a channel call whose
outcome is unknown (a timeout, a 500, a crash mid-call) is reconciled, never blindly made again; and a
message's statuses only move forward."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.actors.conversation import _later_state
from babelhub.codecs import load as load_codec
from babelhub.codecs.base import EncodeContext, HttpResponse, OutboundRequest
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.services.connections import AMBIGUOUS
from babelhub.services.delivery import attempt
from tests import test_windows as whatsapp
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    Processor,
    StartHub,
    eventually,
    telegram_config,
    telegram_responder,
    unique_prefix,
    write_config,
)

CHAT = "4242"
SLACK_CHANNEL = "C111"
FIXTURES = Path(__file__).parent / "fixtures"


class SlowApi(FakeApi):
    """A fake channel API that can act on a call (record it, make its answer) and then hold the answer
    back until `release` is set: the channel did it, the caller never heard."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = 0
        """How many of the next calls are held."""
        self.release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await super()._handle(request)
        if self.hold > 0:
            self.hold -= 1
            await self.release.wait()
        return response


@pytest.fixture
async def slow_api() -> Any:
    api = SlowApi()
    await api.start()
    yield api
    api.release.set()
    await api.stop()


def sends(api: FakeApi, method: str = "/sendMessage") -> list[Recorded]:
    return [call for call in api.requests if call.path.endswith(method)]


def telegram_message(text: str = "hi") -> bytes:
    return json.dumps({"conversation": {"connection": "tg", "native_id": CHAT},
                       "parts": [{"type": "text", "text": text}]}).encode()


def with_call_timeout(config: cfg.Config, seconds: float) -> cfg.Config:
    return msgspec.structs.replace(config, hub=msgspec.structs.replace(config.hub, call_timeout_seconds=seconds))


async def status_of(app: Processor, message_id: str) -> c.Status:
    """The first status the app hears for `message_id` past `accepted`/`queued`."""
    while True:
        status = await app.next_status()
        if status.message_id == message_id and status.state not in ("accepted", "queued"):
            return status


# ------------------------------------------------------------------------------- what is ambiguous


async def test_only_a_call_that_may_have_reached_the_channel_is_ambiguous(fake_api: FakeApi) -> None:
    codec = load_codec("telegram")
    fake_api.queue(Reply(status=500, body={"ok": False, "error_code": 500, "description": "Internal Server Error"}),
                   Reply(status=503, body={"ok": False, "error_code": 503, "description": "Service Unavailable"}))
    request = OutboundRequest(method="POST", url=f"{fake_api.base_url}/bot1:x/sendMessage", body=b"{}")
    async with aiohttp.ClientSession() as session:
        internal = await attempt(session, codec, request, 5)
        unavailable = await attempt(session, codec, request, 5)
        refused = await attempt(session, codec, msgspec.structs.replace(request, url="http://127.0.0.1:9/x"), 5)
    assert internal.retryable and internal.ambiguous
    assert unavailable.retryable and not unavailable.ambiguous  # the front refused it: safe to try again
    assert refused.retryable and not refused.ambiguous  # no connection was made: nothing left


# ------------------------------------------------------------------------------ Telegram: no lookup


async def test_a_500_after_the_channel_acted_fails_ambiguous_instead_of_sending_twice(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    fake_api.queue(Reply(status=500, body={"ok": False, "error_code": 500, "description": "Internal Server Error"}))
    hub = await start_hub(telegram_config(nats_server.url, fake_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    accepted = await hub.outbox.submit(TENANT, telegram_message())
    status = await status_of(app, accepted.id)
    assert status.state == "failed" and status.error is not None and status.error.code == AMBIGUOUS
    assert "may or may not" in status.error.message
    later = await hub.outbox.submit(TENANT, telegram_message("next"))
    assert (await status_of(app, later.id)).state == "sent"  # the conversation carries on
    assert [call.json()["text"] for call in sends(fake_api)] == ["hi", "next"]


async def test_a_timeout_after_the_channel_acted_is_not_sent_again(
        nats_server: EmbeddedServer, nats_client: NATS, slow_api: SlowApi, start_hub: StartHub) -> None:
    slow_api.responder = telegram_responder
    slow_api.hold = 1
    hub = await start_hub(with_call_timeout(telegram_config(nats_server.url, slow_api.base_url), 0.5))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    accepted = await hub.outbox.submit(TENANT, telegram_message())
    status = await status_of(app, accepted.id)
    assert status.state == "failed" and status.error is not None and status.error.code == AMBIGUOUS
    assert "timeout" in status.error.message
    assert len(sends(slow_api)) == 1


async def test_a_crash_with_a_call_in_flight_is_reconciled_on_restart(
        nats_server: EmbeddedServer, nats_client: NATS, slow_api: SlowApi, start_hub: StartHub) -> None:
    """The hub goes down while the channel has taken the call and not answered: the next hub finds the
    call in flight in the send ledger and does not make it again."""
    slow_api.responder = telegram_responder
    slow_api.hold = 1
    config = telegram_config(nats_server.url, slow_api.base_url)
    first = await start_hub(config)
    app = await Processor(nats_client, first.subjects.prefix).start()
    accepted = await first.outbox.submit(TENANT, telegram_message())
    await eventually(lambda: sends(slow_api))
    await asyncio.wait_for(first.stop(), 60)
    slow_api.release.set()

    await start_hub(config)
    status = await status_of(app, accepted.id)
    assert status.state == "failed" and status.error is not None and status.error.code == AMBIGUOUS
    assert len(sends(slow_api)) == 1


# ----------------------------------------------------------------------------- Slack: a lookup exists


def slack_config(nats_url: str, api_base: str) -> cfg.Config:
    config = telegram_config(nats_url, api_base)
    slack = cfg.Connection(id="sl", tenant=TENANT, channel="slack", api_base=api_base,
                           secrets={"bot_token": "xoxb-test", "signing_secret": "slack-signing"})
    return msgspec.structs.replace(config, connections=[*config.connections, slack])


def slack_message(text: str = "hello") -> bytes:
    return json.dumps({"conversation": {"connection": "sl", "native_id": SLACK_CHANNEL},
                       "parts": [{"type": "text", "text": text}]}).encode()


class SlackWorkspace:
    """Answers like the Web API: `chat.postMessage` posts (and keeps) the message; `conversations.history`
    lists the channel's messages with their metadata, as the fixture shows."""

    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    def __call__(self, request: Recorded) -> Reply:
        if request.path.endswith("/chat.postMessage"):
            body = request.json()
            ts = f"1512085950.{len(self.posted) + 300:06d}"
            self.posted.append({"type": "message", "text": body["text"], "ts": ts, "metadata": body["metadata"]})
            return Reply(body={"ok": True, "channel": body["channel"], "ts": ts, "message": self.posted[-1]})
        if request.path.endswith("/conversations.history"):
            assert request.query["include_all_metadata"] == "true"
            answer = json.loads((FIXTURES / "slack" / "response_conversations_history_metadata.json").read_text())
            answer["messages"] = [*reversed(self.posted), answer["messages"][1]]  # newest first
            return Reply(body=answer)
        return Reply(status=404, body={"ok": False, "error": "unknown_method"})


async def test_a_lost_slack_answer_is_found_by_lookup_and_not_posted_again(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    workspace = SlackWorkspace()

    def posts_then_fails(request: Recorded) -> Reply:
        reply = workspace(request)  # the post is made...
        if request.path.endswith("/chat.postMessage") and len(workspace.posted) == 1:
            return Reply(status=500, body=b"internal error")  # ...and its answer is lost
        return reply

    fake_api.responder = posts_then_fails
    hub = await start_hub(slack_config(nats_server.url, fake_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    accepted = await hub.outbox.submit(TENANT, slack_message())
    status = await status_of(app, accepted.id)
    assert (status.state, status.native_id) == ("sent", f"{SLACK_CHANNEL}:{workspace.posted[0]['ts']}")
    assert len(sends(fake_api, "/chat.postMessage")) == 1
    lookup = sends(fake_api, "/conversations.history")[0]
    assert (lookup.method, lookup.query["channel"]) == ("GET", SLACK_CHANNEL)
    assert lookup.headers["authorization"] == "Bearer xoxb-test"


async def test_a_slack_post_the_lookup_shows_absent_is_posted_again(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    workspace = SlackWorkspace()
    failures = [Reply(status=504, body=b"gateway timeout")]

    def fails_before_posting(request: Recorded) -> Reply:
        if request.path.endswith("/chat.postMessage") and failures:
            return failures.pop()  # the channel did not post it
        return workspace(request)

    fake_api.responder = fails_before_posting
    hub = await start_hub(slack_config(nats_server.url, fake_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    accepted = await hub.outbox.submit(TENANT, slack_message())
    status = await status_of(app, accepted.id)
    assert status.state == "sent"
    assert len(sends(fake_api, "/chat.postMessage")) == 2 and len(workspace.posted) == 1


def test_a_slack_lookup_that_cannot_see_every_message_cannot_tell() -> None:
    codec = load_codec("slack")
    message = c.Message(id="m1", tenant=TENANT, conversation=c.Conversation(id="x"), ts=c.now(),
                        direction="outbound", parts=[c.Text(text="hello")])
    ctx = EncodeContext(tenant=TENANT, connection="sl", to=SLACK_CHANNEL, secrets={"bot_token": "xoxb-test"})
    post = codec.encode(message, ctx)[0]
    lookup = codec.lookup_request(post)
    assert lookup is not None
    page = json.loads((FIXTURES / "slack" / "response_conversations_history_metadata.json").read_text())
    page["messages"][0]["metadata"]["event_payload"]["babelhub_call"] = "another:0"
    assert codec.parse_lookup(lookup, post, HttpResponse(body=json.dumps(page).encode())).found is False
    page["has_more"] = True
    assert codec.parse_lookup(lookup, post, HttpResponse(body=json.dumps(page).encode())).found is None
    page["messages"][0]["metadata"]["event_payload"]["babelhub_call"] = post.idempotency_key
    found = codec.parse_lookup(lookup, post, HttpResponse(body=json.dumps(page).encode()))
    assert (found.found, found.native_ids) == (True, [f"{SLACK_CHANNEL}:1512085950.000216"])
    assert codec.parse_lookup(lookup, post, HttpResponse(status=500, body=b"")).found is None


# ------------------------------------------------------------------------------- statuses go forward


@pytest.mark.parametrize(("reached", "state", "forward"), [
    ("sent", "delivered", True), ("delivered", "read", True), ("read", "delivered", False),
    ("read", "read", True), ("sent", "failed", True), ("delivered", "failed", False),
    ("failed", "sent", False), ("failed", "delivered", False), ("read", "deleted", True),
    ("deleted", "read", False), ("accepted", "sent", True), ("sent", "queued", False),
])
def test_a_state_comes_after_another_only_forward(reached: str, state: str, forward: bool) -> None:
    assert _later_state(reached, state) is forward


async def test_a_kill_9_with_a_call_in_flight_is_reconciled_by_the_next_process(
        nats_server: EmbeddedServer, nats_client: NATS, slow_api: SlowApi, tmp_path: Path,
        hub_processes: list[HubProcess]) -> None:
    """`babelhub run` is killed while the channel holds the answer to a call it took: the next process
    finds the call in flight in the send ledger and does not make it again."""
    slow_api.responder = telegram_responder
    slow_api.hold = 1
    port, prefix = free_port(), unique_prefix()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_server.url}"
subject_prefix = "{prefix}"
ack_wait_seconds = 2.0
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "{slow_api.base_url}"
secrets = {{ bot_token = "{BOT_TOKEN}", secret_token = "{SECRET}" }}
""")
    url = f"http://127.0.0.1:{port}"
    first = HubProcess(config, tmp_path)
    hub_processes.append(first)
    first.start()
    await first.wait_ready(url)
    app = await Processor(nats_client, prefix).start()
    conversation = c.Conversation(id=c.conversation_id(TENANT, "tg", CHAT), connection="tg", native_id=CHAT)
    message = c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                        parts=[c.Text(text="exactly once")])
    await app.send(message)
    await eventually(lambda: sends(slow_api), timeout=30)
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    slow_api.release.set()

    second = HubProcess(config, tmp_path)
    hub_processes.append(second)
    second.start()
    await second.wait_ready(url)
    status = await status_of(app, message.id)
    assert status.state == "failed" and status.error is not None and status.error.code == AMBIGUOUS
    assert len(sends(slow_api)) == 1


async def test_a_delivered_receipt_after_read_is_not_published(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """WhatsApp's status webhooks may arrive out of order: `read`, then a late `delivered`."""
    fake_api.responder = whatsapp.sent_ok
    hub = await start_hub(whatsapp.whatsapp_config(nats_server.url, fake_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    inbound = await whatsapp.user_writes(hub, app)
    reply = await app.reply(inbound, c.Text(text="on its way"))
    sent = await status_of(app, reply.id)
    assert sent.state == "sent"
    for name in ("status_read.json", "status_delivered.json"):
        await post_whatsapp_status(hub, name, sent.native_id, inbound.conversation.native_id)
    # Applied after the receipts, in order: by the time the app has it, they are all done.
    await whatsapp.user_writes(hub, app, wamid="wamid.later")
    published = []
    while not app.statuses.empty():
        published.append(app.statuses.get_nowait())
    assert [(s.message_id, s.state) for s in published] == [(reply.id, "read")]


async def post_whatsapp_status(hub: Any, name: str, wamid: str, chat: str) -> None:
    body = json.loads((FIXTURES / "whatsapp" / name).read_text())
    value = body["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = "106540352242922"
    value["statuses"][0].update(id=wamid, recipient_id=chat)
    data = json.dumps(body).encode()
    signature = "sha256=" + hmac.new(whatsapp.APP_SECRET.encode(), data, hashlib.sha256).hexdigest()
    async with aiohttp.ClientSession() as session, session.post(
            f"{hub.http_url}/webhooks/whatsapp/wa", data=data,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature}) as response:
        assert response.status == 200
