"""The hub's media runtime end to end: a fake Twilio (an aiohttp WebSocket client speaking Media Streams
with the messages of tests/fixtures/twilio_media/) calls `WebSocket /media/{connection}` of an
in-process hub on a real nats-server; audio services are `AudioService`s on their own NATS connections.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import WSMsgType
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.audio import AudioFormat, AudioFrame, AudioService
from babelhub.audio.protocol import DtmfPressed, Played, Started, Stopped
from babelhub.hub.app import Hub
from babelhub.media.base import Audio, MediaEvent, MediaSession, Start, WsFrame
from babelhub.media.twilio import TwilioMedia
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.credentials import load_key, tenant_user
from babelhub.sources.media_call import METRICS_BATCH, CallStream
from tests.hubkit import StartHub, dead_letters, stream_messages, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures" / "twilio_media"
TENANT = "acme"
AUTH_TOKEN = "twilio-auth-token-0123456789"
PUBLIC_URL = "wss://hub.example/media/tw"
WAIT = 20.0


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))
    return loaded


def twilio_signature(url: str, token: str = AUTH_TOKEN) -> str:
    return base64.b64encode(hmac.new(token.encode(), url.encode(), hashlib.sha1).digest()).decode()


def media_config(nats_url: str, **hub: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(), **hub),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[cfg.Connection(id="tw", tenant=TENANT, channel="twilio_media",
                                    secrets={"auth_token": AUTH_TOKEN}, options={"public_url": PUBLIC_URL})],
    )


class TwilioCall:
    """One call's Media Stream as Twilio speaks it: `connected`, `start`, `media`…, `dtmf`, `mark`, `stop`."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, call_sid: str) -> None:
        self.socket = socket
        self.call_sid = call_sid
        self.stream_sid = "MZ" + hashlib.md5(call_sid.encode()).hexdigest()
        self._sequence = 0
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type == WSMsgType.TEXT:
                await self.received.put(json.loads(message.data))

    def _stamped(self, message: dict[str, Any]) -> dict[str, Any]:
        self._sequence += 1
        message["sequenceNumber"] = str(self._sequence)
        if "streamSid" in message:
            message["streamSid"] = self.stream_sid
        return message

    async def send(self, message: dict[str, Any]) -> None:
        await self.socket.send_str(json.dumps(message))

    async def begin(self) -> None:
        await self.send(fixture("connected"))
        start = self._stamped(fixture("start"))
        start["start"].update(callSid=self.call_sid, streamSid=self.stream_sid)
        await self.send(start)

    async def media(self, chunk: int, payload: bytes) -> None:
        message = self._stamped(fixture("media"))
        message["media"].update(chunk=str(chunk), timestamp=str(chunk * 20), payload=base64.b64encode(payload).decode())
        await self.send(message)

    async def dtmf(self, digit: str) -> None:
        message = self._stamped(fixture("dtmf"))
        message["dtmf"]["digit"] = digit
        await self.send(message)

    async def mark_played(self, name: str) -> None:
        message = self._stamped(fixture("mark"))
        message["mark"]["name"] = name
        await self.send(message)

    async def stop(self) -> None:
        message = self._stamped(fixture("stop"))
        message["stop"]["callSid"] = self.call_sid
        await self.send(message)

    async def next(self, event: str) -> dict[str, Any]:
        """The next message the hub sent of kind `event` (others before it are skipped)."""
        while True:
            message = await asyncio.wait_for(self.received.get(), WAIT)
            if message["event"] == event:
                return message

    async def played_payloads(self, count: int) -> list[bytes]:
        return [base64.b64decode((await self.next("media"))["media"]["payload"]) for _ in range(count)]

    async def close(self) -> None:
        await self.socket.close()
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader


@asynccontextmanager
async def twilio_call(hub: Hub, call_sid: str, *, signature: str | None = None) -> AsyncIterator[TwilioCall]:
    headers = {"X-Twilio-Signature": twilio_signature(PUBLIC_URL) if signature is None else signature}
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(f"{hub.http_url}/media/tw", headers=headers)
        call = TwilioCall(socket, call_sid)
        try:
            yield call
        finally:
            await call.close()


@asynccontextmanager
async def audio_service(nats_server: EmbeddedServer, hub: Hub) -> AsyncIterator[AudioService]:
    """An audio service on a NATS connection of its own."""
    nc = await nats.connect(nats_server.url)
    try:
        yield AudioService(nc, hub.subjects.prefix, TENANT)
    finally:
        await nc.close()


async def started_call(hub: Hub, service: AudioService, call_sid: str) -> AsyncIterator[tuple[TwilioCall, Started]]:
    async with service.calls() as calls, twilio_call(hub, call_sid) as call:
        await call.begin()
        started = await asyncio.wait_for(anext(aiter(calls)), WAIT)
        yield call, started


def mulaw_packets(count: int, first: int = 0) -> list[bytes]:
    """Distinct 20 ms packets of µ-law 8 kHz (160 bytes each)."""
    return [bytes([(first + n) % 256]) * 160 for n in range(count)]


async def take(feed: Any, count: int) -> list[Any]:
    items: list[Any] = []
    iterator = aiter(feed)
    while len(items) < count:
        items.append(await asyncio.wait_for(anext(iterator), WAIT))
    return items


async def echo(service: AudioService, stream: str, ready: asyncio.Event,
               change: Callable[[AudioFrame], AudioFrame] = lambda frame: frame) -> None:
    """An echo audio service: every `up` frame played back on `down`."""
    async with service.listen(stream) as frames:
        ready.set()
        async for frame in frames:
            await service.play(stream, change(frame))


@asynccontextmanager
async def running(coroutine: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(coroutine)
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def metric(hub: Hub, name: str, direction: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{hub.http_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{direction="{direction}"}}'):
            return float(line.split()[-1])
    return 0.0


async def settled_metric(hub: Hub, name: str, direction: str, expected: float) -> float:
    """The metric once it shows `expected`, or its value after WAIT: relayed frames are counted a batch
    at a time, the rest when the hub has seen the call end (after the provider's socket closed)."""
    value = await metric(hub, name, direction)
    for _ in range(int(WAIT / 0.05)):
        if value == expected:
            break
        await asyncio.sleep(0.05)
        value = await metric(hub, name, direction)
    return value


# ---------------------------------------------------------------------------------------- audio


async def test_audio_goes_up_in_order_and_comes_back_down_through_an_echo_service(
        nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-order") as (call, started):
        assert started.call_id == "CA-order" and started.inbound.codec == "mulaw" and started.outbound.rate == 8000
        tap = await service.listen(started.stream).open()
        ready = asyncio.Event()
        async with running(echo(service, started.stream, ready)):
            await ready.wait()
            sent = mulaw_packets(30)
            for chunk, payload in enumerate(sent):
                await call.media(chunk, payload)
            frames = await take(tap, 30)
            assert [f.payload for f in frames] == sent
            assert [f.seq for f in frames] == list(range(30))
            assert [f.timestamp for f in frames] == [n * 20_000 for n in range(30)]  # Twilio's ms, in µs
            assert await call.played_payloads(30) == sent
        await tap.close()
    assert await settled_metric(hub, "babelhub_audio_frames_relayed_total", "up", 30) == 30


async def test_relayed_frames_are_counted_in_batches_and_the_rest_when_the_call_ends(
        nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    sent = METRICS_BATCH * 2 + 7
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-count") as (call, started):
        async with service.listen(started.stream) as up:
            for chunk, payload in enumerate(mulaw_packets(sent)):
                await call.media(chunk, payload)
            await take(up, sent)
        assert await settled_metric(hub, "babelhub_audio_frames_relayed_total", "up",
                                    METRICS_BATCH * 2) == METRICS_BATCH * 2  # two whole batches, mid-call
    assert await settled_metric(hub, "babelhub_audio_frames_relayed_total", "up", sent) == sent


async def test_audio_in_another_format_is_converted_to_what_the_provider_plays(
        nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-convert") as (call, started):
        for seq in range(5):  # 20 ms of pcm16 at 16 kHz: 640 bytes each
            await service.play(started.stream, AudioFrame(stream=started.stream, seq=seq, timestamp=seq * 20_000,
                                                          codec="pcm16", rate=16000, payload=bytes(640)))
        played = await call.played_payloads(4)
    # µ-law 8 kHz, 20 ms packets; pcm16 silence is µ-law 0xff.
    assert all(len(packet) == 160 for packet in played)
    assert all(set(packet) <= {0xFF, 0x7F} for packet in played)


# ---------------------------------------------------------------------------------- pacing and marks


async def test_clear_drops_the_queued_answer_and_tells_the_provider(nats_server: EmbeddedServer,
                                                                     start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-clear") as (call, started):
        answer = mulaw_packets(250)  # five seconds of audio, queued at once
        for seq, payload in enumerate(answer):
            await service.play(started.stream, AudioFrame(stream=started.stream, seq=seq, timestamp=seq * 20_000,
                                                          codec="mulaw", rate=8000, payload=payload))
        await call.played_payloads(5)  # the answer is playing
        await service.clear(started.stream)
        await service.mark(started.stream, "after-clear")
        media_before_clear = 5
        while (message := await asyncio.wait_for(call.received.get(), WAIT))["event"] != "clear":
            media_before_clear += message["event"] == "media"
        after_clear = []
        while (message := await asyncio.wait_for(call.received.get(), WAIT))["event"] != "mark":
            after_clear.append(message["event"])
        assert message["mark"]["name"] == "after-clear"
        assert after_clear == []  # nothing of the cleared answer follows the clear
        assert media_before_clear < len(answer)


async def test_a_mark_the_provider_acknowledges_becomes_a_played_event_and_activity(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-mark") as (call, started):
        async with service.events(started.stream) as events:
            for seq, payload in enumerate(mulaw_packets(5)):
                await service.play(started.stream, AudioFrame(stream=started.stream, seq=seq, timestamp=seq * 20_000,
                                                              codec="mulaw", rate=8000, payload=payload))
            await service.mark(started.stream, "answer-1")
            await call.played_payloads(5)
            mark = await call.next("mark")  # sent after the audio before it
            assert mark["mark"]["name"] == "answer-1" and mark["streamSid"] == call.stream_sid
            await call.mark_played("answer-1")  # Twilio's acknowledgement
            (played,) = await take(events, 1)
        assert played == Played(stream=started.stream, name="answer-1", acknowledged=True)
    activities = await activities_of(inbound, {"call_started", "mark", "call_ended"})
    assert activities["mark"].detail["name"] == "answer-1"
    assert activities["mark"].detail["stream"] == started.stream


async def test_a_mark_is_played_by_the_pacing_clock_when_the_provider_does_not_acknowledge(
        nats_server: EmbeddedServer, start_hub: StartHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TwilioMedia, "acknowledges_marks", False)  # as a provider without acknowledgements
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-emul") as (call, started):
        async with service.events(started.stream) as events:
            for seq, payload in enumerate(mulaw_packets(10)):
                await service.play(started.stream, AudioFrame(stream=started.stream, seq=seq, timestamp=seq * 20_000,
                                                              codec="mulaw", rate=8000, payload=payload))
            await service.mark(started.stream, "answer-2")
            (played,) = await take(events, 1)
            assert played == Played(stream=started.stream, name="answer-2", acknowledged=False)
            # The audio before the mark went to the provider (and a frame's worth of time passed) before
            # the mark was reported: all of it is in already.
            assert call.received.qsize() == 10
            assert len(await call.played_payloads(10)) == 10
        assert call.received.empty()  # no mark message went to the provider


async def test_a_full_outbound_queue_drops_the_oldest_frames_and_counts_them(nats_server: EmbeddedServer,
                                                                             start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url, media_queue_seconds=0.2))  # 10 packets
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-drop") as (call, started):
        sent = mulaw_packets(60)
        for seq, payload in enumerate(sent):
            await service.play(started.stream, AudioFrame(stream=started.stream, seq=seq, timestamp=seq * 20_000,
                                                          codec="mulaw", rate=8000, payload=payload))
        await service.mark(started.stream, "end")
        played: list[bytes] = []
        while (message := await asyncio.wait_for(call.received.get(), WAIT))["event"] != "mark":
            played.append(base64.b64decode(message["media"]["payload"]))
    assert played[-10:] == sent[-10:]  # the newest were kept, the oldest went
    assert len(played) < len(sent)
    assert await metric(hub, "babelhub_audio_frames_dropped_total", "down") == len(sent) - len(played)


# ------------------------------------------------------------------------------------- DTMF, activities


async def test_dtmf_from_the_caller_is_an_event_and_an_activity_on_the_callers_conversation(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-dtmf") as (call, started), \
            service.events(started.stream) as events:
        await call.dtmf("7")
        (pressed,) = await take(events, 1)
        assert pressed == DtmfPressed(stream=started.stream, digit="7")
        await call.stop()
        (stopped,) = await take(events, 1)
        assert isinstance(stopped, Stopped)
    activities = await activities_of(inbound, {"call_started", "dtmf", "call_ended"})
    conversation = c.conversation_id(TENANT, "tw", "CA-dtmf")  # Twilio names no caller: the call is the chat
    assert started.conversation == conversation
    for activity in activities.values():
        assert activity.conversation.id == conversation and activity.tenant == TENANT
        assert activity.detail["stream"] == started.stream and activity.detail["call_id"] == "CA-dtmf"
    assert activities["dtmf"].detail["digits"] == "7"


async def activities_of(subscription: Any, kinds: set[str]) -> dict[str, c.Activity]:
    found: dict[str, c.Activity] = {}
    while not kinds <= found.keys():
        envelope = c.decode((await subscription.next_msg(timeout=WAIT)).data)
        if isinstance(envelope, c.Activity):
            found[envelope.activity] = envelope
    return found


# ------------------------------------------------------------------------------- takeover and taps


async def test_a_second_audio_service_takes_over_mid_call_without_the_provider_noticing(
        nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as watcher, aclosing_call(hub, watcher, "CA-take") as (call, started):
        async with audio_service(nats_server, hub) as first:
            ready = asyncio.Event()
            async with running(echo(first, started.stream, ready)):
                await ready.wait()
                for chunk, payload in enumerate(mulaw_packets(5)):
                    await call.media(chunk, payload)
                assert await call.played_payloads(5) == mulaw_packets(5)
        # The first service is gone (its NATS connection closed): the caller keeps talking meanwhile.
        for chunk, payload in enumerate(mulaw_packets(5, first=100), start=5):
            await call.media(chunk, payload)
        async with audio_service(nats_server, hub) as second:
            ready = asyncio.Event()
            async with running(echo(second, started.stream, ready)):
                await ready.wait()
                for chunk, payload in enumerate(mulaw_packets(5, first=200), start=10):
                    await call.media(chunk, payload)
                assert await call.played_payloads(5) == mulaw_packets(5, first=200)
        assert not call.socket.closed


async def test_two_taps_both_hear_every_frame_of_one_provider_stream(nats_server: EmbeddedServer,
                                                                      start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-taps") as (call, started), \
            audio_service(nats_server, hub) as recorder, audio_service(nats_server, hub) as transcriber:
        recording = await recorder.listen(started.stream).open()
        transcribing = await transcriber.listen(started.stream).open()
        sent = mulaw_packets(20)
        for chunk, payload in enumerate(sent):
            await call.media(chunk, payload)
        assert [f.payload for f in await take(recording, 20)] == sent
        assert [f.payload for f in await take(transcribing, 20)] == sent
        await recording.close()
        await transcribing.close()


# ------------------------------------------------------------------------------------ hostile input


async def test_a_forged_signature_is_refused_before_the_upgrade(nats_server: EmbeddedServer,
                                                                 start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    forged = twilio_signature(PUBLIC_URL, token="not-the-auth-token")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{hub.http_url}/media/tw", headers={"X-Twilio-Signature": forged})
        assert refused.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as unsigned:
            await session.ws_connect(f"{hub.http_url}/media/tw")
        assert unsigned.value.status == 403


async def test_a_page_of_another_site_cannot_open_a_media_stream(nats_server: EmbeddedServer,
                                                                   start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    signed = {"X-Twilio-Signature": twilio_signature(PUBLIC_URL)}
    async with aiohttp.ClientSession() as session:
        for origin in ("https://evil.example", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{hub.http_url}/media/tw", headers={**signed, "Origin": origin})
            assert refused.value.status == 403
        own = await session.ws_connect(f"{hub.http_url}/media/tw", headers={**signed, "Origin": hub.http_url})
        await own.close()


async def test_an_oversized_frame_closes_the_socket_with_1009(nats_server: EmbeddedServer,
                                                              start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url, media_max_frame_bytes=4096))
    async with twilio_call(hub, "CA-big") as call:
        await call.begin()
        await call.media(0, bytes(4096))  # base64 makes it larger than the limit
        await asyncio.wait_for(call._reader, WAIT)
        assert call.socket.close_code == 1009


async def test_an_unreadable_frame_closes_with_1007_and_is_kept_as_a_dead_letter(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with twilio_call(hub, "CA-bad") as call:
        await call.begin()
        broken = fixture("media")
        broken["media"]["payload"] = "%%% not base64 %%%"
        await call.send(broken)
        await asyncio.wait_for(call._reader, WAIT)
        assert call.socket.close_code == 1007
    letters = await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                    hub.subjects.stream_name("dead_letters"))
    (letter,) = dead_letters(letters)
    assert letter["path"] == "$.media.payload" and b"not base64" in letter["body"]
    assert AUTH_TOKEN.encode() not in msgspec.msgpack.encode(letter)


async def test_a_flood_of_frames_closes_the_socket_with_1008(nats_server: EmbeddedServer,
                                                             start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url, media_frame_rate=5.0, media_frame_burst=20))
    async with twilio_call(hub, "CA-flood") as call:
        await call.begin()
        for chunk, payload in enumerate(mulaw_packets(200)):
            if call.socket.closed:
                break
            with suppress(ConnectionError):
                await call.media(chunk, payload)
        await asyncio.wait_for(call._reader, WAIT)
        assert call.socket.close_code == 1008


async def test_a_down_frame_naming_another_stream_is_ignored_and_counted(nats_server: EmbeddedServer,
                                                                         start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-own") as (call, started), \
            aclosing_call(hub, service, "CA-other") as (other_call, other):
        foreign = AudioFrame(stream=other.stream, seq=0, timestamp=0, codec="mulaw", rate=8000, payload=b"\x01" * 160)
        await service.nc.publish(f"{hub.subjects.prefix}.{TENANT}.audio.{started.stream}.down", foreign.to_bytes())
        await service.mark(started.stream, "m")
        assert (await call.next("mark"))["mark"]["name"] == "m"
        await service.mark(other.stream, "m2")
        assert (await other_call.next("mark"))["mark"]["name"] == "m2"
        assert call.received.empty() and other_call.received.empty()  # neither call played the frame
    assert await metric(hub, "babelhub_audio_frames_dropped_total", "down") == 1


def aclosing_call(hub: Hub, service: AudioService, call_sid: str) -> Any:
    return asynccontextmanager(started_call)(hub, service, call_sid)




async def test_a_bad_control_operation_is_a_dead_letter_and_the_call_goes_on(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-ctl") as (call, started):
        control = f"{hub.subjects.prefix}.{TENANT}.audio.{started.stream}.control"
        for bad in (b'{"op": "explode"}', b'{"op": "mark"}', b"not json", b'{"op": "dtmf", "digits": "12<script>"}'):
            await service.nc.publish(control, bad)
        await service.dtmf(started.stream, "1")  # valid, but Twilio Media Streams cannot play DTMF
        down = f"{hub.subjects.prefix}.{TENANT}.audio.{started.stream}.down"
        await service.nc.publish(down, b"\x09not an audio frame, only words")
        await service.mark(started.stream, "still-here")
        assert (await call.next("mark"))["mark"]["name"] == "still-here"
        assert not call.socket.closed
    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                                 hub.subjects.stream_name("dead_letters")))
    by_body = {letter["body"]: letter for letter in letters}
    assert len(letters) == 6 and set(by_body) == {
        b'{"op": "explode"}', b'{"op": "mark"}', b"not json", b'{"op": "dtmf", "digits": "12<script>"}',
        b'{"op":"dtmf","digits":"1"}', b"\x09not an audio frame, only words"}
    assert by_body[b'{"op": "dtmf", "digits": "12<script>"}']["path"] == "$.digits"
    assert "cannot play DTMF" in by_body[b'{"op":"dtmf","digits":"1"}']["error"]
    assert by_body[b"\x09not an audio frame, only words"]["path"] == "version"
    assert by_body[b"\x09not an audio frame, only words"]["subject"].endswith(".down")


async def test_an_audio_service_hangs_up_the_call(nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, aclosing_call(hub, service, "CA-bye") as (call, started), \
            service.events(started.stream) as events:
        await service.hangup(started.stream, "goodbye")
        (stopped,) = await take(events, 1)
        assert isinstance(stopped, Stopped) and stopped.reason == "goodbye"
        await asyncio.wait_for(call._reader, WAIT)
        assert call.socket.close_code == 1000


def test_a_stream_id_is_stable_per_call_and_differs_between_tenants_and_connections() -> None:
    from babelhub.audio import valid_stream_id
    from babelhub.sources.media_call import stream_id

    ids = {stream_id("acme", "tw", "CA1", "MZ1"), stream_id("acme", "tw", "CA1", "MZ1")}
    assert len(ids) == 1 and valid_stream_id(ids.pop())
    assert len({stream_id("acme", "tw", "CA1", "MZ1"), stream_id("other", "tw", "CA1", "MZ1"),
                stream_id("acme", "tw2", "CA1", "MZ1"), stream_id("acme", "tw", "CA1", "MZ2")}) == 4


async def test_a_tenants_audio_service_reaches_only_its_own_tenants_streams(tmp_path: Path) -> None:
    """On the embedded server, a tenant's NATS user hears and plays into its own calls only, and cannot
    forge a caller's audio or a stream's events."""
    config = media_config("", nats_port=0, data_dir=str(tmp_path / "data"))
    config = msgspec.structs.replace(config, hub=msgspec.structs.replace(config.hub, subject_prefix="bh"),
                                     tenants=[*config.tenants, cfg.Tenant(id="other")])
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    async with Hub(config) as hub:
        user = tenant_user(load_key(tmp_path / "data"), hub.subjects, TENANT)
        nc = await nats.connect(hub.nats_url, user=user.user, password=user.password, inbox_prefix=user.inbox_prefix,
                                error_cb=on_error)
        try:
            service = AudioService(nc, "bh", TENANT)
            ready = asyncio.Event()
            async with service.calls() as calls, twilio_call(hub, "CA-perm") as call:
                await call.begin()
                started = await asyncio.wait_for(anext(aiter(calls)), WAIT)
                async with running(echo(service, started.stream, ready)):
                    await ready.wait()
                    await call.media(0, mulaw_packets(1)[0])
                    assert await call.played_payloads(1) == mulaw_packets(1)
            await nc.subscribe("bh.other.audio.*.up")
            await nc.publish(f"bh.other.audio.{started.stream}.down", b"")
            await nc.publish(f"bh.{TENANT}.audio.{started.stream}.up", b"")
            await nc.publish(f"bh.{TENANT}.audio.{started.stream}.events", b"")
            await nc.flush()
            for _ in range(200):
                if len(errors) >= 4:
                    break
                await asyncio.sleep(0.02)
        finally:
            await nc.close()
    assert len(errors) == 4 and all("permissions violation" in error for error in errors)
    assert any('subscription to "bh.other.audio.*.up"' in error for error in errors)
    assert any(f'publish to "bh.{TENANT}.audio.{started.stream}.up"' in error for error in errors)


class UntimedProvider(MediaSession):
    """A provider protocol whose audio carries no timestamps (binary L16 frames, as some send)."""

    channel = "untimed_media"
    outbound_format = AudioFormat(codec="pcm16", rate=16000, frame_ms=20)

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        return []

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        return [payload]


async def test_audio_without_timestamps_is_stamped_with_the_media_time_counted_from_its_length(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(media_config(nats_server.url))
    to_provider: list[WsFrame] = []

    async def send(frames: list[WsFrame]) -> None:
        to_provider.extend(frames)

    async def hang_up(reason: str) -> None:
        raise AssertionError("not hung up")

    call = CallStream(hub.ctx, hub.ctx.connections["tw"], UntimedProvider({}, {}), send, queue_seconds=1.0,
                      hang_up=hang_up)
    await call.handle(Start(call_id="call-1", inbound_format=AudioFormat(codec="pcm16", rate=16000)))
    async with AudioService(nats_client, hub.subjects.prefix, TENANT).listen(call.stream) as up:
        for size in (640, 320, 640):  # 20 ms, 10 ms, 20 ms of pcm16 at 16 kHz
            await call.handle(Audio(payload=bytes(size)))
        frames = await take(up, 3)
    await call.close("done")
    assert [(f.seq, f.timestamp) for f in frames] == [(0, 0), (1, 20_000), (2, 30_000)]


async def test_audio_for_a_provider_that_stopped_reading_waits_in_the_bounded_queue_not_behind_a_hung_send(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    """Audio due at once is sent straight from the `down` subscription only while the provider's socket
    takes frames without waiting. Once it does not (its buffer holds what the provider has not read),
    the pacer sends, and what follows waits in the call's bounded queue, which drops the oldest and counts
    them, instead of piling up in the subscription behind a send that hangs."""
    hub = await start_hub(media_config(nats_server.url))
    buffered = asyncio.Event()  # the socket's buffer holds unread frames: the next send hangs

    async def send(frames: list[WsFrame]) -> None:
        if buffered.is_set():
            await asyncio.Event().wait()
        buffered.set()

    async def hang_up(reason: str) -> None:
        raise AssertionError("not hung up")

    call = CallStream(hub.ctx, hub.ctx.connections["tw"], UntimedProvider({}, {}), send, queue_seconds=0.2,
                      hang_up=hang_up, writable=lambda: not buffered.is_set())
    await call.handle(Start(call_id="call-stuck", inbound_format=AudioFormat(codec="pcm16", rate=16000)))
    await hub.ctx.nats.flush()  # the call's subscriptions are known to the server
    service = AudioService(nats_client, hub.subjects.prefix, TENANT)
    for seq in range(30):  # 0.6 s of audio for a queue of 0.2 s
        await service.play(call.stream, AudioFrame(stream=call.stream, seq=seq, timestamp=seq * 20_000,
                                                   codec="pcm16", rate=16000, payload=bytes(640)))
    for _ in range(int(WAIT / 0.05)):
        if call.dropped["down"]:
            break
        await asyncio.sleep(0.05)
    await call.close("done")
    assert call.dropped["down"] >= 30 - 10 - 4  # all but the queue's 10 and the few sent or being sent


# ------------------------------------------------------------------------- a binary provider: Vonage

VONAGE_FIXTURES = Path(__file__).parent / "fixtures" / "vonage_media"
VONAGE_AUTHORIZATION = "Bearer custom-vonage-endpoint-value"


async def test_a_vonage_call_of_binary_l16_goes_both_ways_on_the_callers_conversation(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    """Vonage streams binary L16 (its media time counted from the bytes) and names the caller in the
    NCCO headers: binary frames go up and come back, and the call's activities land on the caller's
    conversation, the one its chat on this connection would have."""
    config = media_config(nats_server.url)
    vonage = cfg.Connection(id="vg", tenant=TENANT, channel="vonage_media",
                            secrets={"authorization": VONAGE_AUTHORIZATION})
    hub = await start_hub(msgspec.structs.replace(config, connections=[*config.connections, vonage]))
    inbound = await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")
    connected = json.loads((VONAGE_FIXTURES / "websocket_connected_call_headers.json").read_text("utf-8"))
    service = AudioService(nats_client, hub.subjects.prefix, TENANT)
    async with aiohttp.ClientSession() as session, service.calls() as calls:
        socket = await session.ws_connect(f"{hub.http_url}/media/vg", headers={"Authorization": VONAGE_AUTHORIZATION})
        await socket.send_str(json.dumps(connected))
        started = await asyncio.wait_for(anext(aiter(calls)), WAIT)
        assert (started.caller, started.call_id, started.inbound.rate) == ("447700900000", connected["uuid"], 8000)
        ready = asyncio.Event()
        async with service.listen(started.stream) as up, running(echo(service, started.stream, ready)):
            await ready.wait()
            sent = [bytes([n]) * 320 for n in range(5)]  # 20 ms of L16 at 8 kHz each
            for frame in sent:
                await socket.send_bytes(frame)
            frames = await take(up, 5)
            echoed = [(await asyncio.wait_for(socket.receive(), WAIT)).data for _ in range(5)]
        await socket.close()
    assert [f.timestamp for f in frames] == [n * 20_000 for n in range(5)]
    assert echoed == sent
    activities = await activities_of(inbound, {"call_started", "call_ended"})
    caller_chat = c.conversation_id(TENANT, "vg", "447700900000")
    assert started.conversation == caller_chat
    assert all(activity.conversation.id == caller_chat for activity in activities.values())
    assert activities["call_started"].sender is not None
    assert activities["call_started"].sender.handle == "447700900000"


async def test_the_readmes_audio_service_echoes_every_call(nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8").split(
        "### Telephony media streams and audio on NATS", 1)[1].split("\n### ", 1)[0]
    [block] = re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    hub = await start_hub(media_config(nats_server.url))
    nc = await nats.connect(nats_server.url)
    try:
        async with running(namespace["echo_every_call"](nc, hub.subjects.prefix, TENANT)):
            for call_sid in ("CA-readme-1", "CA-readme-2"):  # two calls, one after the other: each is echoed
                async with twilio_call(hub, call_sid) as call:
                    await call.begin()
                    assert await echoed(call, bytes([7]) * 160)
    finally:
        await nc.close()


async def echoed(call: TwilioCall, packet: bytes) -> bool:
    """Whether `packet`, sent again until the service listens (it learns of the call a moment later),
    comes back."""
    for chunk in range(100):
        await call.media(chunk, packet)
        with suppress(TimeoutError):
            message = await asyncio.wait_for(call.next("media"), 0.1)
            return base64.b64decode(message["media"]["payload"]) == packet
    return False
