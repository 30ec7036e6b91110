"""A channel outage loses nothing: sends wait for the connection's circuit, in order, until the channel
answers or the message's deadline passes; a send that succeeded is never made twice, across kills too.

On real parts: a real nats-server, the hub in-process or as `babelhub run` subprocesses killed with
SIGKILL, and a local fake of the Telegram Bot API that goes down."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.canonical import Error, Message
from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.errors import ConfigError
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.services.circuit import Circuit
from babelhub.services.delivery import attempt, deliver_through
from babelhub.services.pacing import Pacer
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    StartHub,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
)

# ------------------------------------------------------------------------------------- the channel


class FlakyTelegram:
    """Answers like the Bot API, except while it is down: then `sendMessage` gets the 503 a Bot API
    outage gives. `sent` holds the calls it accepted, in the order it accepted them."""

    def __init__(self, *, down_for: float = 0.0, down_after: int = 0) -> None:
        """Down for `down_for` seconds once it has accepted `down_after` messages."""
        self.down_for = down_for
        self.down_after = down_after
        self.down_until: float | None = None
        self.sent: list[Recorded] = []
        self.refused = 0

    def __call__(self, request: Recorded) -> Reply:
        if self.down_until is None and len(self.sent) >= self.down_after and self.down_for:
            self.down_until = time.monotonic() + self.down_for
        if self.down_until is not None and time.monotonic() < self.down_until:
            self.refused += 1
            return Reply(status=503, body={"ok": False, "error_code": 503, "description": "Service Unavailable"})
        self.sent.append(request)
        return telegram_responder(request)

    def texts(self) -> list[str]:
        return [str(request.json()["text"]) for request in self.sent]


def outbound(chat: int, text: str) -> c.Message:
    """A message a processing app sends to Telegram chat `chat` (a proactive one: it names the chat)."""
    conversation = c.Conversation(id=c.conversation_id(TENANT, "tg", str(chat)), channel="telegram",
                                  connection="tg", native_id=str(chat))
    return c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                     parts=[c.Text(text=text)])


async def publish(nc: NATS, prefix: str, message: c.Message) -> None:
    await nc.jetstream().publish(f"{prefix}.{TENANT}.out.{message.conversation.id}", c.encode(message),
                                 headers={"Nats-Msg-Id": message.id})


async def statuses(nc: NATS, prefix: str) -> list[c.Status]:
    """Every status the hub stored, in order."""
    found = await stream_messages(nc, f"{prefix}.{TENANT}.status.>", f"{prefix.upper()}_STATUSES")
    return [status for status in (c.decode(data) for data in found) if isinstance(status, c.Status)]


# ------------------------------------------------------------------------------ delivery, one call


class _PlainJsonApi(Codec):
    """2xx = ok, 429/5xx = retry, anything else = refused."""

    channel = "plain"
    capabilities = Capabilities()

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list:  # type: ignore[type-arg]
        return []

    def encode(self, message: Message, ctx: EncodeContext) -> list[OutboundRequest]:
        return []

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        if response.status < 300:
            return SendResult(ok=True, native_ids=["n1"])
        retryable = response.status == 429 or response.status >= 500
        return SendResult(ok=False, retryable=retryable, error=Error(code=str(response.status), retryable=retryable))


async def test_a_network_error_or_a_timeout_is_reported_retryable(fake_api: FakeApi) -> None:
    async with aiohttp.ClientSession() as session:
        refused = await attempt(session, _PlainJsonApi(), OutboundRequest(method="POST", url="http://127.0.0.1:9/x"), 5)
    assert not refused.ok and refused.retryable
    assert refused.error is not None and refused.error.code == "network" and refused.error.retryable


async def test_a_failing_channel_is_retried_through_the_circuit_until_it_answers(fake_api: FakeApi) -> None:
    fake_api.queue(*[Reply(status=503)] * 6)  # more failures than the old five attempts allowed
    circuit, pacer = Circuit(base_delay=0.01, max_delay=0.02), Pacer(0)
    retries: list[SendResult] = []

    async def on_retry(result: SendResult, wait: float) -> None:
        retries.append(result)

    async with aiohttp.ClientSession() as session:
        request = OutboundRequest(method="POST", url=f"{fake_api.base_url}/send")
        result = await deliver_through(session, _PlainJsonApi(), request, circuit=circuit, pacer=pacer,
                                       deadline=circuit.clock() + 60, on_retry=on_retry)
    assert result.ok and len(fake_api.requests) == 7 and len(retries) == 6
    assert circuit.state == "closed" and circuit.probes == 6


async def test_a_refusal_fails_at_once_and_a_deadline_ends_the_wait(fake_api: FakeApi) -> None:
    circuit, pacer = Circuit(base_delay=0.01, max_delay=0.05), Pacer(0)
    async with aiohttp.ClientSession() as session:
        request = OutboundRequest(method="POST", url=f"{fake_api.base_url}/send")
        fake_api.queue(Reply(status=400))
        refused = await deliver_through(session, _PlainJsonApi(), request, circuit=circuit, pacer=pacer,
                                        deadline=circuit.clock() + 60)
        assert not refused.ok and refused.error == Error(code="400") and len(fake_api.requests) == 1

        fake_api.responder = lambda _: Reply(status=503)
        late = await deliver_through(session, _PlainJsonApi(), request, circuit=circuit, pacer=pacer,
                                     deadline=circuit.clock() + 0.2)
    assert not late.ok and not late.retryable
    assert late.error is not None and late.error.code == "send_deadline" and "503" in late.error.message
    assert circuit.state == "open"


async def test_a_best_effort_call_is_made_once_and_never_while_the_circuit_is_open(fake_api: FakeApi) -> None:
    circuit, pacer = Circuit(base_delay=0.01, max_delay=0.02), Pacer(0)
    fake_api.queue(Reply(status=503))
    async with aiohttp.ClientSession() as session:
        request = OutboundRequest(method="POST", url=f"{fake_api.base_url}/typing")
        failed = await deliver_through(session, _PlainJsonApi(), request, circuit=circuit, pacer=pacer, deadline=None)
        skipped = await deliver_through(session, _PlainJsonApi(), request, circuit=circuit, pacer=pacer,
                                        deadline=None)
    assert failed.error == Error(code="503", retryable=True) and circuit.state == "open"
    assert skipped.error is not None and skipped.error.code == "circuit_open"
    assert len(fake_api.requests) == 1 and circuit.probes == 0


# -------------------------------------------------------------------------------- the hub in-process


def flaky_config(nats_url: str, api_base: str, **connection: object) -> cfg.Config:
    config = telegram_config(nats_url, api_base)
    hub = msgspec.structs.replace(config.hub, ack_wait_seconds=2.0, circuit_max_backoff_seconds=0.2)
    return msgspec.structs.replace(config, hub=hub, connections=[
        msgspec.structs.replace(config.connections[0], **connection)])


async def test_an_outage_holds_each_chats_replies_in_order_and_sends_them_when_it_ends(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    channel = FlakyTelegram(down_for=4.0)
    fake_api.responder = channel
    hub = await start_hub(flaky_config(nats_server.url, fake_api.base_url))
    chats = [42, 43, 44]
    for n in range(4):
        for chat in chats:
            await publish(nats_client, hub.subjects.prefix, outbound(chat, f"{chat}:{n}"))
    await eventually(lambda: len(channel.sent) == 12, timeout=30)
    for chat in chats:
        assert [text for text in channel.texts() if text.startswith(f"{chat}:")] == [f"{chat}:{n}" for n in range(4)]
    await eventually(lambda: hub.metrics.registry.get_sample_value("babelhub_circuit_open", {"connection": "tg"}) == 0)
    states = [status.state for status in await statuses(nats_client, hub.subjects.prefix)]
    assert states == ["sent"] * 12
    assert channel.refused > 0  # it was down, and nothing failed


async def test_a_message_still_unsent_at_its_deadline_is_failed(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    channel = FlakyTelegram(down_for=3600)
    fake_api.responder = channel
    hub = await start_hub(flaky_config(nats_server.url, fake_api.base_url, send_deadline_seconds=1.0))
    assert hub.config.hub.send_deadline_seconds == 86_400  # the connection's own deadline wins
    message = outbound(42, "too late")
    await publish(nats_client, hub.subjects.prefix, message)

    async def failed() -> list[c.Status]:
        return [s for s in await statuses(nats_client, hub.subjects.prefix) if s.message_id == message.id]

    found: list[c.Status] = []
    for _ in range(200):
        found = await failed()
        if found:
            break
        await asyncio.sleep(0.05)
    (status,) = found
    assert status.state == "failed" and status.error is not None
    assert status.error.code == "send_deadline" and not status.error.retryable
    assert status.error.native == {"ok": False, "error_code": 503, "description": "Service Unavailable"}
    assert channel.refused >= 1 and not channel.sent


async def test_a_send_that_succeeded_is_not_made_again_when_its_message_comes_back(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """The hub stops while the channel is down: the messages before the one it waits on were sent but not
    acknowledged (acknowledgements wait for the end of the run of turns), so they come back."""
    channel = FlakyTelegram(down_for=3600, down_after=2)
    fake_api.responder = channel
    config = flaky_config(nats_server.url, fake_api.base_url)
    first = await start_hub(config)
    fake_api.queue(Reply(status=503))  # the messages wait in the conversation: then two go through
    texts = ["first", "second", "third"]
    for text in texts:
        await publish(nats_client, first.subjects.prefix, outbound(42, text))
    await eventually(lambda: channel.texts() == texts[:2] and channel.refused >= 2)
    # Stopping does not wait for the channel: the send waiting for the circuit ends unacknowledged.
    await asyncio.wait_for(first.stop(), timeout=30)

    channel.down_until = 0.0  # the channel is back
    await start_hub(config)
    await eventually(lambda: len(channel.sent) >= 3, timeout=30)
    await asyncio.sleep(config.hub.ack_wait_seconds + 1)  # anything still unacknowledged has come back
    assert channel.texts() == texts
    sent = [s for s in await statuses(nats_client, config.hub.subject_prefix) if s.state == "sent"]
    assert len({status.message_id for status in sent}) == 3


async def test_a_message_split_into_several_calls_resumes_after_the_last_call_made(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    channel = FlakyTelegram(down_for=3600, down_after=1)
    fake_api.responder = channel
    config = flaky_config(nats_server.url, fake_api.base_url)
    first = await start_hub(config)
    long_text = " ".join(["word"] * 1500)  # past Telegram's 4,096 characters: two sendMessage calls
    await publish(nats_client, first.subjects.prefix, outbound(42, long_text))
    await eventually(lambda: len(channel.sent) == 1 and channel.refused >= 1)  # the first part went
    await asyncio.wait_for(first.stop(), timeout=30)

    channel.down_until = 0.0
    await start_hub(config)
    await eventually(lambda: len(channel.sent) >= 2, timeout=30)
    await asyncio.sleep(config.hub.ack_wait_seconds + 1)
    parts = channel.texts()
    assert len(parts) == 2 and parts[0] != parts[1]  # each part once
    assert " ".join(parts).split() == long_text.split()


async def test_a_reply_stored_while_the_hub_was_down_does_not_overtake_the_ones_it_held(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """After a restart JetStream sends what is new at once, but what the old process held only once its
    ack wait has passed: the conversation takes the older ones from the stream first."""
    channel = FlakyTelegram(down_for=3600)
    fake_api.responder = channel
    config = flaky_config(nats_server.url, fake_api.base_url)
    first = await start_hub(config)
    for n in (1, 2):
        await publish(nats_client, first.subjects.prefix, outbound(42, f"held {n}"))
    await eventually(lambda: channel.refused >= 1)
    await asyncio.wait_for(first.stop(), timeout=30)

    await publish(nats_client, config.hub.subject_prefix, outbound(42, "stored while down"))
    channel.down_until = 0.0
    await start_hub(config)
    await eventually(lambda: len(channel.sent) >= 3, timeout=30)
    await asyncio.sleep(config.hub.ack_wait_seconds + 1)  # the held ones have come back by now
    assert channel.texts() == ["held 1", "held 2", "stored while down"]


def test_the_send_deadline_is_checked_and_overridden_per_connection() -> None:
    base = telegram_config("nats://127.0.0.1:1", "http://127.0.0.1:1")
    assert base.send_deadline(base.connections[0]) == 86_400
    own = msgspec.structs.replace(base.connections[0], send_deadline_seconds=60.0)
    assert base.send_deadline(own) == 60
    for hub in ({"send_deadline_seconds": 0}, {"circuit_max_backoff_seconds": -1}):
        with pytest.raises(ConfigError, match=next(iter(hub))):
            cfg.load(None, overrides=hub)


# ----------------------------------------------------------------------- `babelhub run`, killed twice


async def test_a_minute_long_outage_with_two_kills_loses_duplicates_and_reorders_no_reply(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, tmp_path: Path,
        hub_processes: list[HubProcess]) -> None:
    chats, per_chat, outage = 30, 10, 60.0
    channel = FlakyTelegram(down_for=outage, down_after=chats * per_chat // 3)
    fake_api.responder = channel
    port, prefix = free_port(), f"kill{os.getpid()}"
    config = tmp_path / "hub.toml"
    config.write_text(f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_server.url}"
subject_prefix = "{prefix}"
ack_wait_seconds = 3.0
circuit_max_backoff_seconds = 2.0
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "{fake_api.base_url}"
secrets = {{ bot_token = "{BOT_TOKEN}", secret_token = "{SECRET}" }}
""")
    url = f"http://127.0.0.1:{port}"

    async def run_hub() -> HubProcess:
        hub = HubProcess(config, tmp_path)
        hub_processes.append(hub)
        hub.start()
        await hub.wait_ready(url)
        return hub

    hub = await run_hub()
    sent_order = [outbound(chat, f"{chat}:{n}") for n in range(per_chat) for chat in range(1, chats + 1)]
    stored_while_down = sent_order[-chats:]  # each chat's last reply
    for message in sent_order[:-chats]:
        await publish(nats_client, prefix, message)

    await eventually(lambda: channel.down_until is not None, timeout=60)  # a third went, then the channel fell
    assert channel.down_until is not None
    for kill_at in (outage / 6, outage / 2):  # twice while it is down, then a fresh process carries on
        await asyncio.sleep(max(0.0, channel.down_until - outage + kill_at - time.monotonic()))
        hub.stop()
        if kill_at == outage / 2:
            for message in stored_while_down:  # the app goes on replying while no hub runs
                await publish(nats_client, prefix, message)
        hub = await run_hub()
    assert time.monotonic() < channel.down_until, "the kills must fall inside the outage"

    await eventually(lambda: len(channel.sent) >= len(sent_order), timeout=outage + 60)
    await asyncio.sleep(4.0)  # one ack_wait more: whatever was still in flight has come back by now
    texts = channel.texts()
    assert sorted(texts) == sorted(str(m.parts[0].text) for m in sent_order if isinstance(m.parts[0], c.Text))
    assert len(texts) == len(set(texts)), "a reply was sent twice"
    for chat in range(1, chats + 1):
        assert [t for t in texts if t.startswith(f"{chat}:")] == [f"{chat}:{n}" for n in range(per_chat)]
    found = await statuses(nats_client, prefix)
    assert {s.message_id for s in found if s.state == "sent"} == {m.id for m in sent_order}
    assert not [s for s in found if s.state == "failed"]
    assert channel.refused > 0
