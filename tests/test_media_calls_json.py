"""Calls of the providers that carry audio as base64 in JSON text frames — Telnyx media streaming, Plivo
audio streams and Exotel AgentStream — through an in-process hub on a real nats-server, and back.

Each fake provider is an aiohttp WebSocket client that opens `/media/{connection}` with the provider's
documented authentication and speaks its protocol with the messages of its fixtures
(`tests/fixtures/<channel>/`: ids, payloads and sequence numbers changed, nothing invented); Telnyx runs
twice, with µ-law and with L16 at 16 kHz (network byte order on the wire), and Exotel at 8 and 16 kHz
(the packet size follows the rate). What they share is
`JsonCall`; each behaviour is one test run for every provider it applies to. Audio services are
`AudioService`s on NATS connections of their own (helpers of `tests/test_media_streams.py`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from array import array
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, ClassVar

import aiohttp
import msgspec
import pytest
from aiohttp import WSMsgType
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from babelhub import canonical as c
from babelhub.audio import AudioFormat, AudioFrame, AudioService, Converter
from babelhub.audio.protocol import DtmfPressed, Played, Started, Stopped
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.sources.media_call import MAX_TROUBLE_LETTERS
from tests.hubkit import StartHub, dead_letters, stream_messages
from tests.mediakit import MediaFixtures, basic, same_shape, tone, tone_strength
from tests.test_media_streams import TENANT, WAIT, audio_service, echo, media_config, running, take

# ------------------------------------------------------------------------------------ the providers

TELNYX_TOKEN = "telnyx-stream-auth-token-0123456789"
PLIVO_AUTH_TOKEN = "MjFhZTZhYzc0ZWQzYmI3ZTU5NDBjNDQxYzdlZTc4"
PLIVO_URL = "wss://hub.example/media/pl"
EXOTEL_KEY, EXOTEL_TOKEN = "exotel-api-key-0123", "exotel-api-token-0123456789"

_SEQUENCE_FIELDS = ("sequence_number", "sequenceNumber")
_STREAM_FIELDS = ("stream_id", "streamId", "stream_sid")


class JsonCall:
    """One call's media stream as a provider that carries audio as base64 in JSON text frames speaks it:
    its opening request, its messages (built from its fixtures), and what it makes of the hub's. The
    subclasses name the provider's fixtures, fields and events."""

    connection: ClassVar[str]
    """The hub connection this provider calls, `/media/<connection>`."""
    fixtures: ClassVar[MediaFixtures]
    start_fixture: ClassVar[str]
    hello_fixtures: ClassVar[tuple[str, ...]] = ()
    """What the provider sends before `start`."""
    play_event: ClassVar[str]
    clear_event: ClassVar[str]
    mark_event: ClassVar[str]
    out_play: ClassVar[str]
    out_clear: ClassVar[str]
    out_mark: ClassVar[str]
    """The fixtures of the hub's play, clear and mark messages, as the provider documents them."""
    caller: ClassVar[str]
    """The caller the `start` fixture names ("" when the provider names none)."""
    inbound: ClassVar[AudioFormat]
    """The caller's audio as the provider documents it for the `start` fixture (`frame_ms`: its chunks)."""
    outbound: ClassVar[AudioFormat]
    """What the provider plays, in its documented packet size."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, call_id: str) -> None:
        self.socket = socket
        self.call_id = call_id
        self.stream_id = "stream-" + hashlib.sha1(call_id.encode()).hexdigest()[:16]
        self._sequence = 0
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    # ------------------------------------------------------------------ what each provider says

    @classmethod
    def connection_config(cls) -> cfg.Connection:
        raise NotImplementedError

    @classmethod
    def opening_headers(cls, *, forged: bool = False) -> dict[str, str]:
        raise NotImplementedError

    def start_message(self) -> dict[str, Any]:
        raise NotImplementedError

    def media_message(self, chunk: int, payload: bytes, packet_ms: int) -> dict[str, Any]:
        raise NotImplementedError

    def dtmf_message(self, digit: str) -> dict[str, Any]:
        message = self.fixture("dtmf")
        message["dtmf"]["digit"] = digit
        return message

    def mark_played_message(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def stop_message(self) -> dict[str, Any] | None:
        """The provider's message that ends the stream; None when only closing the socket does."""
        raise NotImplementedError

    @staticmethod
    def mark_name(message: dict[str, Any]) -> str:
        name: str = message["mark"]["name"]
        return name

    @staticmethod
    def hub_audio(carried: bytes) -> bytes:
        """Audio as the provider carries it, in the hub's byte order (the same, but for RTP's L16)."""
        return carried

    # ------------------------------------------------------------------ the shared driver

    def fixture(self, name: str) -> dict[str, Any]:
        """The fixture `name` with this call's stream id and the next sequence number (kept in the type
        the provider writes it)."""
        message: dict[str, Any] = self.fixtures.json(name)
        for field in _SEQUENCE_FIELDS:
            if field in message:
                self._sequence += 1
                message[field] = type(message[field])(self._sequence)
        for field in _STREAM_FIELDS:
            if field in message:
                message[field] = self.stream_id
        return message

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type == WSMsgType.TEXT:
                await self.received.put(json.loads(message.data))

    async def send(self, message: dict[str, Any]) -> None:
        await self.socket.send_str(json.dumps(message))

    async def begin(self) -> None:
        for name in self.hello_fixtures:
            await self.send(self.fixture(name))
        await self.send(self.start_message())

    async def media(self, chunk: int, payload: bytes, packet_ms: int) -> None:
        await self.send(self.media_message(chunk, payload, packet_ms))

    async def dtmf(self, digit: str) -> None:
        await self.send(self.dtmf_message(digit))

    async def mark_played(self, name: str) -> None:
        await self.send(self.mark_played_message(name))

    async def stop(self) -> None:
        message = self.stop_message()
        if message is None:
            await self.socket.close()
        else:
            await self.send(message)

    async def next(self, event: str) -> dict[str, Any]:
        """The next message the hub sent of kind `event` (others before it are skipped)."""
        while True:
            message = await asyncio.wait_for(self.received.get(), WAIT)
            if message["event"] == event:
                return message

    async def played_payloads(self, count: int) -> list[bytes]:
        """The audio of the next `count` play messages, each checked against the documented shape."""
        payloads = []
        for _ in range(count):
            message = await self.next(self.play_event)
            assert same_shape(message, self.fixtures.json(self.out_play))
            payloads.append(base64.b64decode(message["media"]["payload"]))
        return payloads

    async def close(self) -> None:
        await self.socket.close()
        self.reader.cancel()
        with suppress(asyncio.CancelledError):
            await self.reader


class TwilioShapedCall(JsonCall):
    """Telnyx and Exotel follow Twilio's messages: `media` with `chunk`, `timestamp` and `payload`, `mark`
    with a `name`, and a `stop` naming the call (in `call_id_field`)."""

    media_fixture = "media"
    call_id_field: ClassVar[str]

    def media_message(self, chunk: int, payload: bytes, packet_ms: int) -> dict[str, Any]:
        message = self.fixture(self.media_fixture)
        message["media"].update(chunk=str(chunk + 1), timestamp=str(chunk * packet_ms),
                                payload=base64.b64encode(payload).decode())
        return message

    def mark_played_message(self, name: str) -> dict[str, Any]:
        message = self.fixture("mark")
        message["mark"]["name"] = name
        return message

    def stop_message(self) -> dict[str, Any] | None:
        message = self.fixture("stop")
        message["stop"][self.call_id_field] = self.call_id
        return message


class TelnyxCall(TwilioShapedCall):
    """Telnyx media streaming in RTP bidirectional mode, PCMU at 8 kHz both ways (the defaults)."""

    connection = "tx"
    fixtures = MediaFixtures("telnyx_media", suffix=".json")
    start_fixture = "start"
    call_id_field = "call_control_id"
    hello_fixtures = ("connected",)
    play_event, clear_event, mark_event = "media", "clear", "mark"
    out_play, out_clear, out_mark = "outbound_media", "outbound_clear", "outbound_mark"
    caller = "+13122010094"
    inbound = outbound = AudioFormat(codec="mulaw", rate=8000, frame_ms=20)
    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def connection_config(cls) -> cfg.Connection:
        return cfg.Connection(id=cls.connection, tenant=TENANT, channel="telnyx_media",
                              secrets={"stream_auth_token": TELNYX_TOKEN}, options=cls.options)

    @classmethod
    def opening_headers(cls, *, forged: bool = False) -> dict[str, str]:
        return {"x-telnyx-streaming-auth-token": "not-the-stream-auth-token" if forged else TELNYX_TOKEN}

    def start_message(self) -> dict[str, Any]:
        message = self.fixture(self.start_fixture)
        message["start"]["call_control_id"] = self.call_id
        return message



class TelnyxL16Call(TelnyxCall):
    """Telnyx started with `stream_codec` L16 and `stream_bidirectional_codec` L16 at 16 kHz: 16-bit
    samples in network byte order both ways, as RTP carries L16."""

    connection = "tx16"
    start_fixture = "start_l16"
    media_fixture = "media_l16"
    inbound = outbound = AudioFormat(codec="pcm16", rate=16000, frame_ms=20)
    options = {"bidirectional_codec": "L16", "bidirectional_sampling_rate": 16000}

    @staticmethod
    def hub_audio(carried: bytes) -> bytes:
        swapped = array("h", carried)
        swapped.byteswap()
        return swapped.tobytes()


class PlivoCall(JsonCall):
    """Plivo audio streams, bidirectional, µ-law at 8 kHz (`contentType="audio/x-mulaw;rate=8000"`)."""

    connection = "pl"
    fixtures = MediaFixtures("plivo_media", suffix=".json")
    start_fixture = "start"
    play_event, clear_event, mark_event = "playAudio", "clearAudio", "checkpoint"
    out_play, out_clear, out_mark = "out_play_audio", "out_clear_audio", "out_checkpoint"
    caller = ""
    inbound = outbound = AudioFormat(codec="mulaw", rate=8000, frame_ms=20)

    @classmethod
    def connection_config(cls) -> cfg.Connection:
        return cfg.Connection(id=cls.connection, tenant=TENANT, channel="plivo_media",
                              secrets={"auth_token": PLIVO_AUTH_TOKEN}, options={"public_url": PLIVO_URL})

    @classmethod
    def opening_headers(cls, *, forged: bool = False) -> dict[str, str]:
        """X-Plivo-Signature-V3 of the URL Plivo calls (no query): base64 HMAC-SHA256 of `<url>.<nonce>`."""
        nonce = "30423764715930124761"
        token = "not-the-auth-token" if forged else PLIVO_AUTH_TOKEN
        signature = base64.b64encode(hmac.new(token.encode(), f"{PLIVO_URL}.{nonce}".encode(),
                                              hashlib.sha256).digest()).decode()
        return {"X-Plivo-Signature-V3": signature, "X-Plivo-Signature-V3-Nonce": nonce}

    def start_message(self) -> dict[str, Any]:
        message = self.fixture(self.start_fixture)
        message["start"].update(callId=self.call_id, streamId=self.stream_id)
        return message

    def media_message(self, chunk: int, payload: bytes, packet_ms: int) -> dict[str, Any]:
        message = self.fixture("media")
        first = int(self.fixtures.json("media")["media"]["timestamp"])
        message["media"].update(chunk=chunk + 1, timestamp=str(first + chunk * packet_ms),
                                payload=base64.b64encode(payload).decode())
        return message

    def mark_played_message(self, name: str) -> dict[str, Any]:
        message = self.fixture("played_stream")
        message["name"] = name
        return message

    def stop_message(self) -> dict[str, Any] | None:
        return None  # Plivo has no stop message: the stream ends with the socket

    @staticmethod
    def mark_name(message: dict[str, Any]) -> str:
        name: str = message["name"]
        return name


class ExotelCall(TwilioShapedCall):
    """Exotel AgentStream of a Voicebot applet: 16-bit PCM at 8 kHz, about 100 ms a chunk."""

    connection = "ex"
    fixtures = MediaFixtures("exotel_media", suffix=".json")
    start_fixture = "start"
    call_id_field = "call_sid"
    hello_fixtures = ("connected",)
    play_event, clear_event, mark_event = "media", "clear", "mark"
    out_play, out_clear, out_mark = "out_media", "out_clear", "out_mark"
    caller = "+919876543210"
    inbound = AudioFormat(codec="pcm16", rate=8000, frame_ms=100)
    outbound = AudioFormat(codec="pcm16", rate=8000, frame_ms=200)  # 3,200 bytes: Exotel's smallest chunk

    @classmethod
    def connection_config(cls) -> cfg.Connection:
        return cfg.Connection(id=cls.connection, tenant=TENANT, channel="exotel_media",
                              secrets={"api_key": EXOTEL_KEY, "api_token": EXOTEL_TOKEN})

    @classmethod
    def opening_headers(cls, *, forged: bool = False) -> dict[str, str]:
        return {"Authorization": basic(EXOTEL_KEY, "not-the-api-token" if forged else EXOTEL_TOKEN)}

    def start_message(self) -> dict[str, Any]:
        message = self.fixture(self.start_fixture)
        message["start"].update(call_sid=self.call_id, stream_sid=self.stream_id)
        return message



class Exotel16kCall(ExotelCall):
    """Exotel with the applet URL's `?sample-rate=16000`: its chunks are then 100 ms long."""

    connection = "ex16"
    start_fixture = "start_16k"
    inbound = outbound = AudioFormat(codec="pcm16", rate=16000, frame_ms=100)


CALLS: list[type[JsonCall]] = [TelnyxCall, TelnyxL16Call, PlivoCall, ExotelCall, Exotel16kCall]
PROVIDERS = [pytest.param(TelnyxCall, id="telnyx"), pytest.param(TelnyxL16Call, id="telnyx-l16"),
             pytest.param(PlivoCall, id="plivo"), pytest.param(ExotelCall, id="exotel"),
             pytest.param(Exotel16kCall, id="exotel-16k")]


def config_of(nats_url: str) -> cfg.Config:
    """One hub with a connection for each provider (Telnyx with µ-law and L16 streams, Exotel at 8 and
    16 kHz)."""
    config = media_config(nats_url)
    connections = [provider.connection_config() for provider in CALLS]
    return msgspec.structs.replace(config, connections=connections)


@asynccontextmanager
async def provider_call(hub: Hub, provider: type[JsonCall], call_id: str) -> AsyncIterator[JsonCall]:
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(f"{hub.http_url}/media/{provider.connection}",
                                          headers=provider.opening_headers())
        call = provider(socket, call_id)
        try:
            yield call
        finally:
            await call.close()


@asynccontextmanager
async def started_call(hub: Hub, service: AudioService, provider: type[JsonCall],
                       call_id: str) -> AsyncIterator[tuple[JsonCall, Started]]:
    async with service.calls() as calls, provider_call(hub, provider, call_id) as call:
        await service.nc.flush()  # the server has the subscription before the call starts
        await call.begin()
        started = await asyncio.wait_for(anext(aiter(calls)), WAIT)
        yield call, started


def packets(audio: AudioFormat, count: int, first: int = 1) -> list[bytes]:
    """`count` distinct packets of `audio`'s packet size, no two neighbouring bytes alike (so that a
    sample's bytes swapped show)."""
    return [bytes((first + n + i) % 256 for i in range(audio.frame_bytes())) for n in range(count)]


def frames(stream: str, audio: AudioFormat, payloads: list[bytes]) -> list[AudioFrame]:
    """`payloads` as audio frames of `stream` in the format `audio`, one after the other."""
    return [AudioFrame(stream=stream, seq=seq, timestamp=seq * audio.frame_ms * 1000, codec=audio.codec,
                       rate=audio.rate, channels=audio.channels, payload=payload)
            for seq, payload in enumerate(payloads)]


async def play(service: AudioService, started: Started, audio: AudioFormat, payloads: list[bytes]) -> None:
    for frame in frames(started.stream, audio, payloads):
        await service.play(started.stream, frame)


async def call_activities(subscription: Subscription) -> list[c.Activity]:
    """The activities stored on `…in.*` up to a call's end, in order; then the subscription is dropped
    (one left with messages would hold the client's drain)."""
    found: list[c.Activity] = []
    try:
        while not found or found[-1].activity != "call_ended":
            envelope = c.decode((await subscription.next_msg(timeout=WAIT)).data)
            if isinstance(envelope, c.Activity):
                found.append(envelope)
    finally:
        await subscription.unsubscribe()
    return found


# ------------------------------------------------------------------------------------ start and stop

@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_call_starts_on_nats_and_as_an_activity_on_the_callers_conversation_and_stops(
        provider: type[JsonCall], nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    await nats_client.flush()
    call_id = f"call-start-{provider.connection}"
    async with audio_service(nats_server, hub) as service, started_call(hub, service, provider, call_id) as (
            call, started), service.events(started.stream) as events:
        await service.nc.flush()  # the server has the subscriptions before the hub reports
        assert (started.call_id, started.provider_stream, started.caller) == (call_id, call.stream_id,
                                                                               provider.caller)
        assert (started.connection, started.channel) == (provider.connection, provider.connection_config().channel)
        assert started.inbound == provider.inbound and started.outbound == provider.outbound
        await call.stop()
        (stopped,) = await take(events, 1)
        assert isinstance(stopped, Stopped)
        await asyncio.wait_for(call.reader, WAIT)  # the hub closes the socket once the stream stopped
    activities = await call_activities(inbound)
    assert [activity.activity for activity in activities] == ["call_started", "call_ended"]
    conversation = c.conversation_id(TENANT, provider.connection, provider.caller or call_id)
    assert started.conversation == conversation
    for activity in activities:
        assert activity.conversation.id == conversation and activity.tenant == TENANT
        assert activity.detail["stream"] == started.stream and activity.detail["call_id"] == call_id
    assert activities[-1].detail["reason"] == stopped.reason


async def test_exotels_stop_reason_is_the_calls_end_reason(nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, ExotelCall, "call-bye") as (
            call, started), service.events(started.stream) as events:
        await service.nc.flush()  # the server has the subscriptions before the hub reports
        await call.stop()
        (stopped,) = await take(events, 1)
    assert isinstance(stopped, Stopped) and stopped.reason == "callended"


# ------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_callers_audio_goes_up_in_order_and_an_echo_comes_back_in_the_providers_play_message(
        provider: type[JsonCall], nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, provider, "call-echo") as (
            call, started):
        heard = await service.listen(started.stream).open()
        ready = asyncio.Event()
        async with running(echo(service, started.stream, ready)):
            await ready.wait()
            await service.nc.flush()  # the server has the echo's subscription
            inbound, outbound = provider.inbound, provider.outbound
            sent = packets(inbound, 10)
            for chunk, payload in enumerate(sent):
                await call.media(chunk, payload, inbound.frame_ms)
            up = await take(heard, 10)
            played = await call.played_payloads(len(sent) * len(sent[0]) // outbound.frame_bytes())
        await heard.close()
    assert [f.payload for f in up] == [call.hub_audio(payload) for payload in sent]
    assert [f.seq for f in up] == list(range(10))
    assert [f.timestamp for f in up] == [n * inbound.frame_ms * 1000 for n in range(10)]
    assert {(f.codec, f.rate) for f in up} == {(inbound.codec, inbound.rate)}
    assert all(len(packet) == outbound.frame_bytes() for packet in played)  # the provider's packet size
    assert b"".join(played) == b"".join(sent)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_audio_of_another_format_is_played_in_the_providers_format_and_packets(
        provider: type[JsonCall], nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, provider, "call-tone") as (
            call, started):
        wideband = AudioFormat(codec="pcm16", rate=24000, frame_ms=20)  # a format none of them plays
        sound = tone(400, 24000, 1200)  # 1.2 s of a 400 Hz tone
        step = wideband.frame_bytes()
        for frame in frames(started.stream, wideband, [sound[at:at + step] for at in range(0, len(sound), step)]):
            await service.play(started.stream, frame)
        outbound = provider.outbound
        played = await call.played_payloads(1000 // outbound.frame_ms)  # one second of it
    assert all(len(packet) == outbound.frame_bytes() for packet in played)
    heard = call.hub_audio(b"".join(played))
    linear = Converter(outbound, AudioFormat(codec="pcm16", rate=outbound.rate)).convert(heard)
    rms, share = tone_strength(linear[len(linear) // 4:], outbound.rate)  # past the resampler's start
    assert rms > 2000 and share > 0.9


# ----------------------------------------------------------------------------------- clear and marks


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_clear_drops_the_queued_answer_and_sends_the_providers_clear(
        provider: type[JsonCall], nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, provider, "call-clear") as (
            call, started):
        answer = packets(provider.outbound, 5000 // provider.outbound.frame_ms)  # five seconds, queued at once
        await play(service, started, provider.outbound, answer)
        await call.played_payloads(2)  # the answer is playing
        await service.clear(started.stream)
        await service.mark(started.stream, "after-clear")
        played_before_clear = 2
        while (message := await asyncio.wait_for(call.received.get(), WAIT))["event"] != call.clear_event:
            played_before_clear += message["event"] == call.play_event
        assert message == call.fixture(call.out_clear)  # as documented, naming this call's stream
        after_clear = []
        while (message := await asyncio.wait_for(call.received.get(), WAIT))["event"] != call.mark_event:
            after_clear.append(message["event"])
    assert call.mark_name(message) == "after-clear"
    assert after_clear == []  # nothing of the cleared answer follows the clear
    assert played_before_clear < len(answer)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_mark_goes_to_the_provider_and_its_acknowledgement_is_a_played_event_and_activity(
        provider: type[JsonCall], nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    await nats_client.flush()
    async with audio_service(nats_server, hub) as service, started_call(hub, service, provider, "call-mark") as (
            call, started), service.events(started.stream) as events:
        await service.nc.flush()  # the server has the subscriptions before the hub reports
        answer = packets(provider.outbound, 3)
        await play(service, started, provider.outbound, answer)
        await service.mark(started.stream, "answer-1")
        assert [call.hub_audio(packet) for packet in await call.played_payloads(3)] == answer
        mark = await call.next(call.mark_event)  # sent after the audio before it
        assert same_shape(mark, call.fixtures.json(call.out_mark)) and call.mark_name(mark) == "answer-1"
        assert mark.get("streamId", mark.get("stream_sid", call.stream_id)) == call.stream_id
        await call.mark_played("answer-1")  # the provider's acknowledgement
        (played,) = await take(events, 1)
    assert played == Played(stream=started.stream, name="answer-1", acknowledged=True)
    (mark_activity,) = [activity for activity in await call_activities(inbound) if activity.activity == "mark"]
    assert mark_activity.detail["name"] == "answer-1" and mark_activity.detail["acknowledged"] is True
    assert mark_activity.conversation.id == started.conversation


# ------------------------------------------------------------------------------------------------ DTMF


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_dtmf_from_the_caller_is_an_event_and_an_activity_on_the_callers_conversation(
        provider: type[JsonCall], nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    await nats_client.flush()
    async with audio_service(nats_server, hub) as service, started_call(hub, service, provider, "call-dtmf") as (
            call, started), service.events(started.stream) as events:
        await service.nc.flush()  # the server has the subscriptions before the hub reports
        await call.dtmf("7")
        await call.dtmf("#")
        pressed = await take(events, 2)
    assert pressed == [DtmfPressed(stream=started.stream, digit="7"), DtmfPressed(stream=started.stream, digit="#")]
    keys = [activity for activity in await call_activities(inbound) if activity.activity == "dtmf"]
    assert [activity.detail["digits"] for activity in keys] == ["7", "#"]
    assert all(activity.conversation.id == started.conversation for activity in keys)


async def test_dtmf_from_an_audio_service_is_plivos_send_dtmf(nats_server: EmbeddedServer, nats_client: NATS,
                                                              start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    await nats_client.flush()
    async with audio_service(nats_server, hub) as service, started_call(hub, service, PlivoCall, "call-keys") as (
            call, started):
        await service.dtmf(started.stream, "1234#")
        sent = await call.next("sendDTMF")
    assert sent == PlivoCall.fixtures.json("out_send_dtmf")  # the documented example sends these very digits
    (keys,) = [activity for activity in await call_activities(inbound) if activity.activity == "dtmf"]
    assert keys.direction == "outbound" and keys.detail["digits"] == "1234#"


# ----------------------------------------------------------------------------------------- hostile


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_forged_opening_request_is_refused_before_the_upgrade(
        provider: type[JsonCall], nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    url = f"{hub.http_url}/media/{provider.connection}"
    async with aiohttp.ClientSession() as session:
        for headers in (provider.opening_headers(forged=True), {}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers=headers)
            assert refused.value.status == 403
        genuine = await session.ws_connect(url, headers=provider.opening_headers())
        await genuine.close()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_unreadable_frame_closes_with_1007_and_is_kept_as_a_dead_letter(
        provider: type[JsonCall], nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    async with provider_call(hub, provider, "call-broken") as call:
        await call.begin()
        broken = call.media_message(0, b"", 20)
        broken["media"]["payload"] = "%%% not base64 %%%"
        await call.send(broken)
        await asyncio.wait_for(call.reader, WAIT)
        assert call.socket.close_code == 1007
    letters = await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                    hub.subjects.stream_name("dead_letters"))
    (letter,) = dead_letters(letters)
    assert letter["path"] == "$.media.payload" and b"not base64" in letter["body"]
    assert letter["connection"] == provider.connection
    secrets = provider.connection_config().secrets
    assert not any(secret.encode() in msgspec.msgpack.encode(letter) for secret in secrets.values())


# -------------------------------------------------------------------------------- Telnyx error frames


async def test_a_telnyx_error_frame_is_logged_and_kept_as_a_dead_letter_and_the_call_goes_on(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="babelhub.media")
    hub = await start_hub(config_of(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, TelnyxCall, "call-err") as (
            call, started), service.events(started.stream) as events:
        await service.nc.flush()  # the server has the subscriptions before the hub reports
        error = call.fixture("error")
        error["payload"]["detail"] += f" (token {TELNYX_TOKEN} echoed back)"  # code 100002, unknown_error
        await call.send(error)
        await call.dtmf("5")  # read after the error frame: its letter is stored once this is reported
        assert await take(events, 1) == [DtmfPressed(stream=started.stream, digit="5")]
        await service.mark(started.stream, "still-here")
        assert call.mark_name(await call.next("mark")) == "still-here"  # the call goes on
        assert not call.socket.closed
    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                                 hub.subjects.stream_name("dead_letters")))
    (letter,) = letters
    assert letter["stage"] == "media" and letter["connection"] == "tx"
    assert letter["error"].startswith("telnyx_media reported error 100002: unknown_error: An unknown error occurred")
    assert json.loads(letter["body"])["payload"]["code"] == 100002  # the provider's report itself
    assert TELNYX_TOKEN.encode() not in msgspec.msgpack.encode(letter)
    logged = [record.getMessage() for record in caplog.records if "reported error 100002" in record.getMessage()]
    assert len(logged) == 1 and "unknown_error" in logged[0] and TELNYX_TOKEN not in logged[0]


async def test_a_flood_of_telnyx_error_frames_keeps_only_the_first_as_dead_letters(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(config_of(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, TelnyxCall, "call-errs") as (
            call, started), service.events(started.stream) as events:
        await service.nc.flush()  # the server has the subscriptions before the hub reports
        for n in range(MAX_TROUBLE_LETTERS + 15):
            error = call.fixture("error")
            error["payload"]["detail"] = f"report {n}"
            await call.send(error)
        await call.dtmf("5")  # read after every error frame
        assert await take(events, 1) == [DtmfPressed(stream=started.stream, digit="5")]
        assert not call.socket.closed
    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                                 hub.subjects.stream_name("dead_letters")))
    assert len(letters) == MAX_TROUBLE_LETTERS
    assert [letter["error"].rsplit(" ", 1)[-1] for letter in letters] == [str(n) for n in range(MAX_TROUBLE_LETTERS)]
