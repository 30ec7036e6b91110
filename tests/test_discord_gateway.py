"""The `discord_gateway` inbound source against a local fake of Discord's Gateway (tests/fakegateway.py),
through an in-process hub on a real nats-server: identify, heartbeats, resume, invalid sessions, fatal
close codes, a hub restart, and frames that are no gateway payload."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest

from babelhub import canonical as c
from babelhub.codecs.base import HttpRequest
from babelhub.errors import ConfigError
from babelhub.hub import app as hub_app
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port, partition_of
from tests.fakegateway import FakeGateway, GatewaySocket, fixture
from tests.hubkit import (
    TENANT,
    Processor,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    unique_prefix,
)

TOKEN = "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs"
PUBLIC_KEY = "e2d3b4a1" * 8
TASK = "discord-gateway:dc"
FAST_HELLO = fixture("discord_gateway/hello.json", d={"heartbeat_interval": 100})
"""Hello with a heartbeat every 100 ms, so that tests see beats (and missed ACKs) quickly."""

# Discord's "List of Intents": GUILDS, GUILD_MESSAGES, GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGES,
# DIRECT_MESSAGE_REACTIONS, MESSAGE_CONTENT.
DEFAULT_INTENTS = (1 << 0) | (1 << 9) | (1 << 10) | (1 << 12) | (1 << 13) | (1 << 15)


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway(TOKEN)
    await fake.start()
    yield fake
    await fake.stop()


def gateway_config(nats_url: str, gateway: FakeGateway, *, token: str = TOKEN, **options: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[cfg.Connection(id="dc", tenant=TENANT, channel="discord", mode="discord_gateway",
                                    api_base=f"{gateway.base_url}/api/v10",
                                    secrets={"public_key": PUBLIC_KEY, "bot_token": token}, options=options)],
    )


async def established(gateway: FakeGateway, seq: int = 1) -> GatewaySocket:
    """The hub's next socket, taken through Hello, Identify and READY."""
    socket = await gateway.next_socket()
    await socket.send(FAST_HELLO)
    await socket.expect(2)
    await socket.send(gateway.ready(seq))
    return socket


async def resumed(gateway: FakeGateway, seq: int, timeout: float = 15.0) -> GatewaySocket:
    """The hub's next socket, which must resume the session at `seq`."""
    socket = await gateway.next_socket(timeout)
    assert socket.path == "/resume" and socket.query == {"v": "10", "encoding": "json"}
    await socket.send(FAST_HELLO)
    resume = await socket.expect(6)
    assert resume["d"] == {"token": TOKEN, "session_id": "evenmorerandomstring", "seq": seq}
    return socket


def message_create(seq: int, message_id: str, content: str) -> dict[str, Any]:
    """The codec's MESSAGE_CREATE fixture as another message (its own id, sequence number and text)."""
    frame = fixture("discord/gateway_message_create.json", s=seq)
    frame["d"].update(id=message_id, content=content)
    return frame


def text_of(envelope: c.Envelope) -> str:
    assert isinstance(envelope, c.Message)
    return " ".join(part.text for part in envelope.parts if isinstance(part, c.Text))


async def raw_records(nats_client: Any, hub: Hub) -> list[bytes]:
    return await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.raw.>", hub.subjects.stream_name("raw"))


async def test_identifies_heartbeats_and_records_a_message_without_the_token(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub = await start_hub(gateway_config(nats_server.url, gateway))
    app = await Processor(nats_client, hub.subjects.prefix).start()

    socket = await gateway.next_socket()
    assert gateway.bot_requests[0]["authorization"] == f"Bot {TOKEN}"
    assert socket.path == "/gateway" and socket.query == {"v": "10", "encoding": "json"}
    await socket.send(FAST_HELLO)
    identify = await socket.expect(2)
    assert identify["d"]["token"] == TOKEN and identify["d"]["intents"] == DEFAULT_INTENTS
    assert set(identify["d"]["properties"]) == {"os", "browser", "device"}
    await socket.heartbeat_with(None)  # no dispatch yet
    await socket.send(gateway.ready(seq=1))
    await socket.heartbeat_with(1)

    # Someone pastes the bot's token into a channel: it reaches nobody, the raw record neither.
    frame = fixture("discord/gateway_message_create.json")
    frame["d"]["content"] += f" {TOKEN}"
    await socket.send(frame)
    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.native.id == "290926798999357250:334385199974967099"
    assert TOKEN not in text_of(envelope) and "***" in text_of(envelope)
    await socket.heartbeat_with(frame["s"])

    (raw,) = await raw_records(nats_client, hub)  # READY and the beats made no record
    assert TOKEN.encode() not in raw
    record = msgspec.msgpack.decode(raw, type=HttpRequest)
    assert json.loads(record.body)["t"] == "MESSAGE_CREATE"
    assert record.headers == {"content-type": "application/json"}  # nothing that could pass for a signature
    assert hub.task_health[TASK].state == "running"
    assert TOKEN not in caplog.text


async def test_an_interaction_is_recorded_then_answered_over_http_and_never_through_a_webhook(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub = await start_hub(gateway_config(nats_server.url, gateway))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    socket = await established(gateway)
    interaction = fixture("discord/interaction_slash_command.json")
    await socket.send({"op": 0, "s": 2, "t": "INTERACTION_CREATE", "d": interaction})

    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.meta["discord.interaction_token"] == interaction["token"]
    await eventually(lambda: len(gateway.callbacks) == 1)
    path, headers, answer = gateway.callbacks[0]
    assert path == f"/api/v10/interactions/{interaction['id']}/{interaction['token']}/callback"
    assert answer == {"type": 5}  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: the app answers at its pace
    assert "authorization" not in headers  # the interaction's token is the credential
    await socket.send({"op": 0, "s": 3, "t": "INTERACTION_CREATE", "d": interaction})  # replayed
    await socket.heartbeat_with(3)
    assert len(gateway.callbacks) == 1 and app.inbound.empty()
    assert interaction["token"] not in caplog.text

    # The connection comes in through the gateway only: a "bridge" cannot post into it.
    async with aiohttp.ClientSession() as http, http.post(f"{hub.http_url}/webhooks/discord/dc",
                                                         json=interaction) as response:
        assert response.status == 404


async def test_a_missed_heartbeat_ack_closes_the_zombie_and_resumes_with_the_last_sequence(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub) -> None:
    hub = await start_hub(gateway_config(nats_server.url, gateway))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    socket = await established(gateway)
    await socket.send(fixture("discord/gateway_message_create.json"))
    await app.next()

    socket.ack = False
    assert await socket.wait_closed() not in (None, 1000, 1001)  # 1000 and 1001 would end the session
    again = await resumed(gateway, seq=42)
    await again.send(fixture("discord_gateway/resumed.json", s=42))
    await again.send(message_create(43, "334385199974967100", "after the resume"))
    envelope, _ = await app.next()
    assert text_of(envelope) == "after the resume"


async def test_reconnect_resumes_and_a_server_heartbeat_request_is_answered_at_once(
        nats_server: EmbeddedServer, gateway: FakeGateway, start_hub: StartHub) -> None:
    await start_hub(gateway_config(nats_server.url, gateway))
    socket = await gateway.next_socket()
    # An hour between beats: the hub's own first one (after a random part of it) almost surely comes later.
    await socket.send(fixture("discord_gateway/hello.json", d={"heartbeat_interval": 3_600_000}))
    await socket.expect(2)
    await socket.send(gateway.ready(seq=5))
    await socket.send(fixture("discord_gateway/heartbeat_request.json"))
    await socket.heartbeat_with(5)

    await socket.send(fixture("discord_gateway/reconnect.json"))
    assert await socket.wait_closed() not in (None, 1000, 1001)
    await resumed(gateway, seq=5)


async def test_invalid_sessions_resume_or_identify_afresh_as_the_gateway_says(
        nats_server: EmbeddedServer, gateway: FakeGateway, start_hub: StartHub) -> None:
    await start_hub(gateway_config(nats_server.url, gateway, intents=513))
    socket = await gateway.next_socket()
    await socket.send(FAST_HELLO)
    assert (await socket.expect(2))["d"]["intents"] == 513  # options.intents
    await socket.send(gateway.ready(seq=7))
    await socket.heartbeat_with(7)

    await socket.send(fixture("discord_gateway/invalid_session_resumable.json"))
    socket = await resumed(gateway, seq=7)

    await socket.send(fixture("discord_gateway/invalid_session.json"))
    fresh = await gateway.next_socket()
    assert fresh.path == "/gateway"
    await fresh.send(FAST_HELLO)
    assert (await fresh.expect(2))["d"]["token"] == TOKEN
    await fresh.send(gateway.ready(seq=1))

    await fresh.close(4009)  # session timed out: "Reconnect and start a new one"
    newer = await gateway.next_socket()
    assert newer.path == "/gateway"
    await newer.send(FAST_HELLO)
    await newer.expect(2)


async def test_a_resume_url_that_cannot_be_reached_is_given_up_for_a_new_session(
        nats_server: EmbeddedServer, gateway: FakeGateway, start_hub: StartHub) -> None:
    await start_hub(gateway_config(nats_server.url, gateway))
    socket = await gateway.next_socket()
    await socket.send(FAST_HELLO)
    await socket.expect(2)
    ready = gateway.ready(seq=1)
    ready["d"]["resume_gateway_url"] = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    await socket.send(ready)
    await socket.heartbeat_with(1)
    await socket.send(fixture("discord_gateway/reconnect.json"))

    fresh = await gateway.next_socket(timeout=30)  # after a few tries at the resume URL
    assert fresh.path == "/gateway"
    await fresh.send(FAST_HELLO)
    await fresh.expect(2)


async def test_authentication_failed_stops_the_connection_and_reports_it(
        nats_server: EmbeddedServer, gateway: FakeGateway, start_hub: StartHub,
        caplog: pytest.LogCaptureFixture) -> None:
    hub = await start_hub(gateway_config(nats_server.url, gateway))
    socket = await gateway.next_socket()
    await socket.send(FAST_HELLO)
    await socket.expect(2)
    await socket.close(4004, b"Authentication failed.")

    await eventually(lambda: hub.task_health[TASK].failing)
    assert "4004" in hub.task_health[TASK].state and "authentication failed" in hub.task_health[TASK].state
    await asyncio.sleep(1.5)  # several backoffs' worth: no new socket, no new GET /gateway/bot
    assert gateway.sockets.empty() and len(gateway.bot_requests) == 1
    assert "4004" in caplog.text and TOKEN not in caplog.text


async def test_a_refused_bot_token_is_not_retried(nats_server: EmbeddedServer, gateway: FakeGateway,
                                                 start_hub: StartHub, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "MTk4NjIyNDgzNDcxOTI1MjQ4.wrong.token-that-discord-refuses"
    hub = await start_hub(gateway_config(nats_server.url, gateway, token=wrong))
    await eventually(lambda: hub.task_health[TASK].failing)
    assert "401" in hub.task_health[TASK].state
    await asyncio.sleep(1.5)
    assert len(gateway.bot_requests) == 1 and not gateway.opened
    assert wrong not in caplog.text


async def test_a_restarted_hub_resumes_the_stored_session_and_a_replay_is_not_doubled(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub) -> None:
    config = gateway_config(nats_server.url, gateway)
    first = await start_hub(config)
    app = await Processor(nats_client, first.subjects.prefix).start()
    socket = await established(gateway)
    await socket.send(fixture("discord/gateway_message_create.json"))  # s 42
    await app.next()
    await first.stop()
    assert await socket.wait_closed() == 4000  # not 1000 or 1001: the session stays resumable

    second = await start_hub(config)
    again = await resumed(gateway, seq=42)
    # A gateway that replays from the last message the hub had, and then what it missed.
    await again.send(fixture("discord/gateway_message_create.json"))
    await again.send(message_create(43, "334385199974967100", "missed while restarting"))
    await again.send(fixture("discord_gateway/resumed.json", s=43))
    envelope, _ = await app.next()
    assert text_of(envelope) == "missed while restarting"
    await again.heartbeat_with(43)
    await asyncio.sleep(0.3)
    assert app.inbound.empty()  # the replayed message came once
    assert len(await raw_records(nats_client, second)) == 2


async def test_a_hub_that_hands_the_connection_over_closes_its_socket_first_and_the_next_owner_resumes(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = gateway_config(nats_server.url, gateway)
    # Members own partition n by n modulo their number, in the order of their names: name the second hub
    # so that the connection's partition becomes its own.
    partition = partition_of(TENANT, "dc", config.hub.partitions)
    names = ["member-0", "member-1"]
    second_name = names[partition % 2]
    monkeypatch.setattr(hub_app, "member_id", iter([names[1 - partition % 2], second_name]).__next__)
    first = await start_hub(config)
    app = await Processor(nats_client, first.subjects.prefix).start()
    socket = await established(gateway)
    await socket.send(fixture("discord/gateway_message_create.json"))  # s 42
    await app.next()

    await start_hub(config)
    assert await socket.wait_closed() == 4000  # handed over while running, and resumable
    again = await resumed(gateway, seq=42)
    assert first.ready  # the first hub runs on, without the connection
    await again.send(message_create(43, "334385199974967100", "to the new owner"))
    envelope, _ = await app.next()
    assert text_of(envelope) == "to the new owner"
    assert gateway.overlaps == 0 and len(gateway.opened) == 2


async def test_a_dispatch_nats_cannot_take_is_not_acknowledged_and_comes_again_on_resume(
        tmp_path: Path, gateway: FakeGateway) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        async with Hub(gateway_config(server.url, gateway)) as hub:
            socket = await established(gateway)
            await socket.send(fixture("discord/gateway_message_create.json"))  # s 42, stored
            await socket.heartbeat_with(42)
            await server.stop()
            await eventually(lambda: not hub.ctx.publisher.connected)
            during = message_create(43, "334385199974967100", "during the outage")
            await socket.send(during)
            assert await socket.wait_closed() == 4000  # the session stays, so Discord replays it

            await server.start()
            nc = await nats.connect(server.url)
            try:
                app = await Processor(nc, hub.subjects.prefix).start()
                again = await resumed(gateway, seq=42, timeout=60)  # once NATS and the partition are back
                await again.send(during)
                await again.send(fixture("discord_gateway/resumed.json", s=43))
                # The app subscribed only now: the message stored before the outage may reach it first, if the
                # hub had not handed it on yet; then the one sent during the outage, once.
                texts = [text_of((await app.next(timeout=30))[0])]
                if texts[0] != "during the outage":
                    texts.append(text_of((await app.next(timeout=30))[0]))
                assert texts in (["during the outage"], ["@Ian **Supa** Hot, see the file", "during the outage"])
                assert len(await raw_records(nc, hub)) == 2
            finally:
                await nc.drain()
    finally:
        await server.stop()


async def test_frames_that_are_no_payload_or_too_big_are_parked_and_the_socket_resumed(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub,
        caplog: pytest.LogCaptureFixture) -> None:
    hub = await start_hub(gateway_config(nats_server.url, gateway, gateway_max_frame_bytes=64 * 1024))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    socket = await established(gateway)

    await socket.send('{"op": 0, "t": "MESSAGE_CREATE", "s": 2, "d": {"id": ')  # cut short
    assert await socket.wait_closed() not in (None, 1000, 1001)
    subject = f"{hub.subjects.prefix}.{TENANT}.dlq.>"
    parked = dead_letters(await stream_messages(nats_client, subject, hub.subjects.stream_name("dead_letters")))
    assert len(parked) == 1 and "no gateway payload" in parked[0]["error"]
    assert parked[0]["body"].startswith(b'{"op": 0')

    socket = await resumed(gateway, seq=1)
    await socket.send(fixture("discord_gateway/resumed.json", s=1))
    await socket.send(message_create(2, "334385199974967101", "x" * (80 * 1024)))  # over the 64 KiB limit
    assert await socket.wait_closed() == 1009

    socket = await resumed(gateway, seq=1)
    await socket.send(message_create(2, "334385199974967101", "small enough"))
    envelope, _ = await app.next()
    assert text_of(envelope) == "small enough"
    assert hub.task_health[TASK].crashes == 0
    assert "no gateway payload" in caplog.text


def _ready_without_session() -> dict[str, Any]:
    ready = fixture("discord_gateway/ready.json")
    del ready["d"]["session_id"]
    return ready


@pytest.mark.parametrize(("after_identify", "frame", "reason"), [
    (False, fixture("discord_gateway/hello.json", d={"heartbeat_interval": 0}), "a Hello that is unreadable"),
    (False, fixture("discord_gateway/hello.json", d={"heartbeat_interval": "45000"}), "a Hello that is unreadable"),
    (False, fixture("discord_gateway/heartbeat_ack.json"), "a first frame with op 11, not Hello"),
    (False, b"x\x9c\x03\x00", "a binary frame"),  # zlib, which the hub did not ask for
    (True, _ready_without_session(), "READY is unreadable"),
    (True, '{"t": "MESSAGE_CREATE", "s": 2, "d": {}}', "no gateway payload"),  # no op
    (True, '{"op": 0, "s": 2, "t": "TYPING_START", "d": ' + "[" * 100_000 + "]" * 100_000 + "}", "no gateway payload"),
], ids=["hello-interval-0", "hello-interval-text", "ack-first", "binary", "ready-without-session", "no-op",
        "nested-deeper-than-python"])
async def test_a_frame_the_hub_cannot_read_is_parked_and_the_gateway_dialled_again(
        nats_server: EmbeddedServer, nats_client: Any, gateway: FakeGateway, start_hub: StartHub,
        after_identify: bool, frame: Any, reason: str) -> None:
    hub = await start_hub(gateway_config(nats_server.url, gateway))
    socket = await gateway.next_socket()
    if after_identify:
        await socket.send(FAST_HELLO)
        await socket.expect(2)
    await socket.send(frame)
    assert await socket.wait_closed() not in (None, 1000, 1001)
    subject = f"{hub.subjects.prefix}.{TENANT}.dlq.>"
    parked = dead_letters(await stream_messages(nats_client, subject, hub.subjects.stream_name("dead_letters")))
    assert len(parked) == 1 and reason in parked[0]["error"], parked

    again = await gateway.next_socket()
    assert again.path == "/gateway"  # no session was made: identify afresh
    await again.send(FAST_HELLO)
    await again.expect(2)
    assert hub.task_health[TASK].crashes == 0


async def test_only_discord_connections_can_hold_a_discord_gateway(nats_server: EmbeddedServer) -> None:
    config = telegram_config(nats_server.url, "http://127.0.0.1:9")
    connection = msgspec.structs.replace(config.connections[0], mode="discord_gateway")
    bad = msgspec.structs.replace(config, connections=[connection])
    with pytest.raises(ConfigError, match=r"\$\.connections\[0\]\.mode: channel telegram has no Discord gateway"):
        async with Hub(bad):
            pass
