"""Providers that carry audio in binary WebSocket frames, through a running hub: Asterisk
`chan_websocket`, Genesys AudioHook and the hub's own `client_media`.

Each fake provider is an aiohttp WebSocket client that opens `WebSocket /media/{connection}` the way
the provider does (Asterisk with its `websocket_client.conf` Basic credentials, Genesys with `X-API-KEY`
and an RFC 9421 signature made now, a media client with nothing) and speaks its protocol with messages
read from `tests/fixtures/<channel>/` (only ids and counters changed). An in-process hub on a real
nats-server relays the calls; audio services are `AudioService`s on their own NATS connections.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import msgspec
import pytest
from aiohttp import WSMsgType
from nats.aio.client import Client as NATS
from yarl import URL

from babelhub import canonical as c
from babelhub.audio import AudioFormat, AudioFrame, AudioService
from babelhub.audio.protocol import DtmfPressed, Played, Started, Stopped, StreamEvent
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.hubkit import StartHub, dead_letters, stream_messages, unique_prefix
from tests.mediakit import basic
from tests.test_media_streams import TENANT, WAIT, activities_of, audio_service, echo, metric, running, take

FIXTURES = Path(__file__).parent / "fixtures"
ASTERISK_USER, ASTERISK_PASSWORD = "asterisk", "chan-websocket-password"
GENESYS_URL = "wss://audiohook.example.com/media/gn"
"""Where Genesys is configured to connect: the hub behind a proxy (its `public_url`), signed over."""

Received = str | bytes
"""One message the hub sent: text or binary."""


def fixture_text(channel: str, name: str) -> str:
    return (FIXTURES / channel / name).read_text("utf-8")


def fixture(channel: str, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fixture_text(channel, name))
    return loaded


def genesys_secrets() -> dict[str, str]:
    secrets: dict[str, str] = fixture("genesys_media", "connect_request_signed.json")["_secrets"]
    return secrets


def binary_config(nats_url: str, **hub: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(), **hub),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[
            cfg.Connection(id="ast", tenant=TENANT, channel="asterisk_media",
                           secrets={"username": ASTERISK_USER, "password": ASTERISK_PASSWORD}),
            cfg.Connection(id="gn", tenant=TENANT, channel="genesys_media", secrets=genesys_secrets(),
                           options={"public_url": GENESYS_URL}),
            cfg.Connection(id="cm", tenant=TENANT, channel="client_media"),
        ],
    )


# ------------------------------------------------------------------------------ the fake providers


class BinaryCall(ABC):
    """One call's socket as a provider holds it: what all three protocols share (reading what the hub
    sends, in order). Each subclass opens the socket as its provider does and builds its messages from
    the provider's fixtures."""

    connection: ClassVar[str]
    caller: ClassVar[str]
    """The caller the protocol names (its conversation), or "" where it names none."""
    inbound: ClassVar[AudioFormat]
    """The caller's audio as the fixtures' start message declares it."""
    packet_bytes: ClassVar[int]
    """The size of one packet the hub plays to this provider."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, call_id: str) -> None:
        self.socket = socket
        self.call_id = call_id
        self.received: asyncio.Queue[Received] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    def headers(cls, call_id: str) -> dict[str, str]:
        return {}

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await self.received.put(message.data)

    async def closed(self) -> int | None:
        """Wait until the hub has closed the socket; its close code."""
        await asyncio.wait_for(self._reader, WAIT)
        return self.socket.close_code

    async def close(self) -> None:
        await self.socket.close()
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader

    async def next(self) -> Received:
        return await asyncio.wait_for(self.received.get(), WAIT)

    async def played(self, total_bytes: int) -> list[bytes]:
        """The audio packets the hub sends until `total_bytes` of audio came (other messages skipped)."""
        packets: list[bytes] = []
        while sum(map(len, packets)) < total_bytes:
            message = await self.next()
            if isinstance(message, bytes):
                packets.append(self.audio_of(message))
        return packets

    def audio_of(self, message: bytes) -> bytes:
        """The audio in a binary message of the hub's."""
        return message

    def frame(self, n: int) -> bytes:
        """The caller's `n`-th 20 ms of audio, distinct from the others."""
        return bytes([(n * 7 + 1) % 256]) * self.inbound.frame_bytes()

    # What each protocol says, in its own messages.

    @abstractmethod
    async def begin(self) -> None:
        """Start the call as the provider does."""

    async def audio(self, n: int, payload: bytes) -> None:
        await self.socket.send_bytes(payload)

    @abstractmethod
    async def dtmf(self, digit: str) -> None:
        """Report a key the caller pressed."""

    @abstractmethod
    def is_mark(self, message: Received, name: str) -> bool:
        """Whether `message` asks the provider to acknowledge the mark `name`."""

    @abstractmethod
    async def acknowledge(self, name: str) -> None:
        """Tell the hub the audio before the mark `name` has been played."""

    @abstractmethod
    def is_clear(self, message: Received) -> bool:
        """Whether `message` tells the provider to drop the audio it has not played yet."""

    @abstractmethod
    def is_hangup(self, message: Received, reason: str) -> bool:
        """Whether `message` ends the stream from the hub's side."""

    def dtmf_played(self, message: Received) -> str | None:
        """The digits `message` plays to the call, if it is one that does (None where the protocol has none)."""
        return None

    async def sync(self) -> list[Received]:
        """Everything the hub has sent so far, read in order (up to a reply the protocol gives at once,
        where it has one)."""
        messages = []
        while not self.received.empty():
            messages.append(self.received.get_nowait())
        return messages

    async def nudge(self) -> None:  # noqa: B027 - most protocols need no nudge
        """Send something the protocol sends anyway, so that the hub reads a frame (where marks are
        reported only with a frame read: Genesys)."""

    @abstractmethod
    async def stop(self) -> None:
        """End the call as the provider does."""

    stop_reason: ClassVar[str]


class AsteriskCall(BinaryCall):
    """Asterisk `chan_websocket` in its JSON format: MEDIA_START, binary µ-law, DTMF_END,
    MEDIA_MARK_PROCESSED; it ends a call by closing the socket."""

    connection = "ast"
    caller = ""
    inbound = AudioFormat(codec="mulaw", rate=8000)
    packet_bytes = 160  # the fixture's optimal_frame_size
    stop_reason = "the provider's socket closed"

    @classmethod
    def headers(cls, call_id: str) -> dict[str, str]:
        return {"Authorization": basic(ASTERISK_USER, ASTERISK_PASSWORD)}

    def event(self, name: str, **fields: Any) -> str:
        message = fixture("asterisk_media", name)
        if "channel_id" in message:
            message["channel_id"] = self.call_id
        return json.dumps(message | fields)

    async def begin(self) -> None:
        await self.socket.send_str(self.event("media_start.json", connection_id=f"conn-{self.call_id}"))

    async def dtmf(self, digit: str) -> None:
        await self.socket.send_str(self.event("dtmf_end.json", digit=digit))

    def is_mark(self, message: Received, name: str) -> bool:
        return isinstance(message, str) and json.loads(message) == {"command": "MARK_MEDIA", "correlation_id": name}

    async def acknowledge(self, name: str) -> None:
        await self.socket.send_str(self.event("media_mark_processed.json", correlation_id=name))

    def is_clear(self, message: Received) -> bool:
        return isinstance(message, str) and json.loads(message) == {"command": "FLUSH_MEDIA"}

    def is_hangup(self, message: Received, reason: str) -> bool:
        return isinstance(message, str) and json.loads(message) == {"command": "HANGUP"}

    async def flow(self, event: str) -> None:
        await self.socket.send_str(self.event(f"media_{event}.json"))

    async def stop(self) -> None:
        await self.socket.close()


class AsteriskTextCall(AsteriskCall):
    """Asterisk `chan_websocket` in its plain-text format (the default): one line per event and command."""

    def line(self, name: str, **fields: str) -> str:
        text = fixture_text("asterisk_media", name).strip()
        for field, value in {"channel_id": self.call_id, **fields}.items():
            text = re.sub(rf"\b{field}:\S+", f"{field}:{value}", text)
        return text

    async def begin(self) -> None:
        await self.socket.send_str(self.line("media_start.txt", connection_id=f"conn-{self.call_id}"))

    async def dtmf(self, digit: str) -> None:
        await self.socket.send_str(self.line("dtmf_end.txt", digit=digit))

    def is_mark(self, message: Received, name: str) -> bool:
        return message == f"MARK_MEDIA {name}"

    async def acknowledge(self, name: str) -> None:
        event, _, _ = fixture_text("asterisk_media", "media_mark_processed.txt").strip().partition(" ")
        await self.socket.send_str(f"{event} {name}")

    def is_clear(self, message: Received) -> bool:
        return message == "FLUSH_MEDIA"

    def is_hangup(self, message: Received, reason: str) -> bool:
        return message == "HANGUP"


class GenesysCall(BinaryCall):
    """Genesys Cloud AudioHook (Audio Connector, or Monitor with `monitor`): `open` → `opened`, binary
    PCMU, `dtmf`, `playback_completed`, `ping` → `pong`, `close` → `closed`, every message numbered."""

    connection = "gn"
    caller = "+1-555-555-1234"  # the fixtures' participant.ani
    inbound = AudioFormat(codec="mulaw", rate=8000)
    packet_bytes = 1600  # 200 ms
    stop_reason = "end"  # the close fixture's reason

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, call_id: str) -> None:
        super().__init__(socket, call_id)
        self.session = genesys_session(call_id)
        self.seq = 0
        self.serverseq = 0
        """The last `seq` the hub sent, which each message reports."""

    @classmethod
    def headers(cls, call_id: str) -> dict[str, str]:
        return signed_headers(genesys_session(call_id))

    async def send(self, name: str, **parameters: Any) -> dict[str, Any]:
        """The fixture `name` as the next message of this session."""
        message = fixture("genesys_media", name)
        self.seq += 1
        message.update(id=self.session, seq=self.seq, serverseq=self.serverseq)
        message["parameters"].update(parameters)
        await self.socket.send_str(json.dumps(message))
        return message

    async def reply(self, kind: str, clientseq: int | None = None) -> tuple[dict[str, Any], list[Received]]:
        """The hub's next message of `kind` (answering the message `clientseq`, when given), and what came
        before it."""
        before: list[Received] = []
        while True:
            message = await self.next()
            if isinstance(message, str):
                answer = json.loads(message)
                self.serverseq = answer["seq"]
                if answer["type"] == kind and clientseq in (None, answer["clientseq"]):
                    return answer, before
            before.append(message)

    async def begin(self, opening: str = "open_audio_connector.json") -> dict[str, Any]:
        await self.send(opening, conversationId=self.call_id)
        opened, _ = await self.reply("opened")
        return opened

    async def dtmf(self, digit: str) -> None:
        await self.send("dtmf.json", digit=digit)

    def is_mark(self, message: Received, name: str) -> bool:
        return False  # AudioHook has no marks: `playback_completed` says all audio sent was played

    async def acknowledge(self, name: str) -> None:
        await self.send("playback_completed.json")
        await self.nudge()  # a mark set just after it is reported with the next frame read

    def is_clear(self, message: Received) -> bool:
        return isinstance(message, str) and json.loads(message)["type"] == "event" and \
            json.loads(message)["parameters"] == {"entities": [{"type": "barge_in", "data": {}}]}

    def is_hangup(self, message: Received, reason: str) -> bool:
        return isinstance(message, str) and json.loads(message)["type"] == "disconnect" and \
            json.loads(message)["parameters"] == {"reason": "completed", "info": reason}

    async def sync(self) -> list[Received]:
        ping = await self.send("ping.json")
        _, before = await self.reply("pong", clientseq=ping["seq"])
        return before

    async def nudge(self) -> None:
        await self.send("ping.json")  # Genesys pings every few seconds anyway

    async def stop(self) -> None:
        await self.send("close.json")


class ClientCall(BinaryCall):
    """The hub's own `client_media`: `start`, binary `AudioFrame`s, `dtmf`, `played`, `stop`."""

    connection = "cm"
    caller = "visitor-42"  # the start fixture's caller
    inbound = AudioFormat(codec="pcm16", rate=16000)
    packet_bytes = 640  # 20 ms of pcm16 at 16 kHz, as it `plays`
    stop_reason = "hung up"  # the stop fixture's reason

    async def begin(self) -> None:
        await self.socket.send_str(json.dumps(fixture("client_media", "start.json") | {"call": self.call_id}))

    async def audio(self, n: int, payload: bytes) -> None:
        frame = AudioFrame(stream=self.call_id, seq=n, timestamp=n * 20_000, codec=self.inbound.codec,
                           rate=self.inbound.rate, channels=self.inbound.channels, payload=payload)
        await self.socket.send_bytes(frame.to_bytes())

    def audio_of(self, message: bytes) -> bytes:
        frame = AudioFrame.from_bytes(message)
        assert (frame.stream, frame.codec, frame.rate, frame.channels) == (self.call_id, "pcm16", 16000, 1)
        return frame.payload

    async def dtmf(self, digit: str) -> None:
        await self.socket.send_str(json.dumps(fixture("client_media", "dtmf.json") | {"digits": digit}))

    def is_mark(self, message: Received, name: str) -> bool:
        return isinstance(message, str) and json.loads(message) == {"type": "mark", "name": name}

    async def acknowledge(self, name: str) -> None:
        await self.socket.send_str(json.dumps(fixture("client_media", "played.json") | {"mark": name}))

    def is_clear(self, message: Received) -> bool:
        return isinstance(message, str) and json.loads(message) == {"type": "clear"}

    def is_hangup(self, message: Received, reason: str) -> bool:
        return isinstance(message, str) and json.loads(message) == {"type": "hangup", "reason": reason}

    def dtmf_played(self, message: Received) -> str | None:
        if isinstance(message, str) and (command := json.loads(message))["type"] == "dtmf":
            return str(command["digits"])
        return None

    async def stop(self) -> None:
        await self.socket.send_str(fixture_text("client_media", "stop.json"))


PROTOCOLS = [pytest.param(AsteriskCall, id="asterisk"), pytest.param(AsteriskTextCall, id="asterisk-text"),
             pytest.param(GenesysCall, id="genesys"), pytest.param(ClientCall, id="client_media")]


def genesys_session(call_id: str) -> str:
    """The AudioHook session id of a call (a UUID-shaped id, as Genesys makes them)."""
    digest = hashlib.sha256(call_id.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def signed_headers(session: str, *, created: int | None = None, secret: str | None = None) -> dict[str, str]:
    """The documented opening request's AudioHook headers for `session`, signed now (RFC 9421 HMAC-SHA256
    with the client secret, as Genesys signs them) over the hub's `public_url`."""
    document = fixture("genesys_media", "connect_request_signed.json")
    secrets = document["_secrets"]
    headers = {name: document["headers"][name] for name in
               ("audiohook-organization-id", "audiohook-correlation-id", "x-api-key", "signature-input")}
    headers["audiohook-session-id"] = session
    created = int(time.time()) if created is None else created
    headers["signature-input"] = re.sub(r";created=\d+;expires=\d+", f";created={created};expires={created + 300}",
                                        headers["signature-input"])
    params = headers["signature-input"].split("=", 1)[1]
    url = URL(GENESYS_URL)
    lines = [f'"@request-target": {url.path}', f'"@authority": {url.host}']
    lines += [f'"{name}": {headers[name]}' for name in
              ("audiohook-organization-id", "audiohook-session-id", "audiohook-correlation-id", "x-api-key")]
    lines.append(f'"@signature-params": {params}')
    key = base64.b64decode(secrets["client_secret"] if secret is None else secret)
    signature = hmac.new(key, "\n".join(lines).encode(), hashlib.sha256).digest()
    headers["signature"] = f"sig1=:{base64.b64encode(signature).decode()}:"
    return headers


@asynccontextmanager
async def provider_call(hub: Hub, protocol: type[BinaryCall], call_id: str) -> AsyncIterator[Any]:
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(f"{hub.http_url}/media/{protocol.connection}",
                                          headers=protocol.headers(call_id))
        call = protocol(socket, call_id)
        try:
            yield call
        finally:
            await call.close()


@asynccontextmanager
async def started_call(hub: Hub, service: AudioService, protocol: type[BinaryCall],
                       call_id: str) -> AsyncIterator[tuple[Any, Started]]:
    async with service.calls() as calls, provider_call(hub, protocol, call_id) as call:
        await call.begin()
        started = await asyncio.wait_for(anext(aiter(calls)), WAIT)
        yield call, started


async def play(service: AudioService, stream: str, protocol: type[BinaryCall], count: int, first: int = 0) -> bytes:
    """`count` distinct 20 ms frames in the caller's format played to `stream`; their audio."""
    audio = protocol.inbound
    payloads = [bytes([(first + n) % 256 | 1]) * audio.frame_bytes() for n in range(count)]
    for seq, payload in enumerate(payloads):
        await service.play(stream, AudioFrame(stream=stream, seq=seq, timestamp=seq * 20_000, codec=audio.codec,
                                              rate=audio.rate, channels=audio.channels, payload=payload))
    return b"".join(payloads)


async def next_event(events: Any, kind: type[StreamEvent]) -> Any:
    """The next event of `kind` on a stream's events feed (others skipped)."""
    while not isinstance(event := (await take(events, 1))[0], kind):
        pass
    return event


async def played_event(events: Any, call: BinaryCall, name: str) -> Played:
    """The `played` event of the mark `name`, nudging the provider's side meanwhile where its protocol
    reports marks only with a frame read (Genesys)."""
    iterator = aiter(events)
    waiting: asyncio.Task[Any] = asyncio.ensure_future(anext(iterator))
    try:
        async with asyncio.timeout(WAIT):
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.05)
                if not done:
                    await call.nudge()
                    continue
                event = waiting.result()
                if isinstance(event, Played) and event.name == name:
                    return event
                waiting = asyncio.ensure_future(anext(iterator))
    finally:
        waiting.cancel()


async def conversations(nc: NATS, hub: Hub) -> Any:
    """A subscription to what processors see on the tenant's conversations (`…in.*`); unsubscribe it
    once read, or the client's drain waits for what is left in it."""
    return await nc.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.*")


# --------------------------------------------------------------------------------- start and audio


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_call_starts_its_audio_goes_up_in_order_and_an_echo_comes_back_in_the_providers_packets(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub, protocol: type[BinaryCall]) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    inbound = await conversations(nats_client, hub)
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-echo") as (
            call, started):
        expected_call_id = "call-echo"
        assert (started.call_id, started.channel, started.connection) == (
            expected_call_id, hub.ctx.connections[protocol.connection].channel, protocol.connection)
        assert (started.inbound.codec, started.inbound.rate, started.inbound.channels) == (
            protocol.inbound.codec, protocol.inbound.rate, 1)
        assert started.outbound.frame_bytes() == protocol.packet_bytes
        tap = await service.listen(started.stream).open()
        ready = asyncio.Event()
        async with running(echo(service, started.stream, ready)):
            await ready.wait()
            sent = [call.frame(n) for n in range(20)]
            for n, payload in enumerate(sent):
                await call.audio(n, payload)
            frames = await take(tap, 20)
            assert [f.payload for f in frames] == sent
            assert [f.seq for f in frames] == list(range(20))
            assert [f.timestamp for f in frames] == [n * 20_000 for n in range(20)]
            assert {(f.codec, f.rate, f.channels) for f in frames} == {
                (protocol.inbound.codec, protocol.inbound.rate, 1)}
            packets = await call.played(sum(map(len, sent)))
        await tap.close()
        assert b"".join(packets) == b"".join(sent)
        assert {len(packet) for packet in packets} == {protocol.packet_bytes}  # the provider's packet size
    activities = await activities_of(inbound, {"call_started"})
    await inbound.unsubscribe()
    caller = protocol.caller or expected_call_id
    assert started.conversation == c.conversation_id(TENANT, protocol.connection, caller)
    assert activities["call_started"].conversation.id == started.conversation
    assert activities["call_started"].detail["stream"] == started.stream


async def test_genesys_gets_opened_with_its_counters_and_the_offer_it_chose(
        nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    async with provider_call(hub, GenesysCall, "call-open") as call:
        opened = await call.begin()
        offered = fixture("genesys_media", "open_audio_connector.json")["parameters"]["media"]
        assert (opened["version"], opened["id"], opened["seq"], opened["clientseq"]) == ("2", call.session, 1, 1)
        assert opened["parameters"]["media"] == offered[:1]
        await call.send("ping.json")
        pong, _ = await call.reply("pong")
        assert (pong["seq"], pong["clientseq"]) == (2, 2)


async def test_audio_genesys_discarded_or_held_back_moves_the_media_time_of_the_up_frames_on(
        nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, GenesysCall, "call-gaps") as (
            call, started), service.listen(started.stream) as up:
        await call.audio(0, call.frame(0))
        discarded = await call.send("discarded.json")  # audio the client dropped
        await call.audio(1, call.frame(1))
        await call.send("paused.json")
        resumed = await call.send("resumed.json")  # audio not sent while paused
        await call.audio(2, call.frame(2))
        frames = await take(up, 3)
    gaps = [round(float(message["parameters"]["discarded"][2:-1]) * 1_000_000) for message in (discarded, resumed)]
    assert [f.seq for f in frames] == [0, 1, 2]
    assert [f.timestamp for f in frames] == [0, 20_000 + gaps[0], 40_000 + gaps[0] + gaps[1]]


# ---------------------------------------------------------------------------------- DTMF and stop


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_dtmf_and_the_end_of_the_call_are_events_and_activities_on_the_callers_conversation(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub, protocol: type[BinaryCall]) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    inbound = await conversations(nats_client, hub)
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-keys") as (
            call, started), service.events(started.stream) as events:
        await call.dtmf("5")
        assert await next_event(events, DtmfPressed) == DtmfPressed(stream=started.stream, digit="5")
        await call.stop()
        stopped = await next_event(events, Stopped)
        assert stopped.reason == protocol.stop_reason
        if isinstance(call, GenesysCall):  # a `close` is answered with `closed`, then the socket closes
            closed, _ = await call.reply("closed")
            assert (closed["seq"], closed["clientseq"]) == (2, 3)
        assert await call.closed() == 1000
    activities = await activities_of(inbound, {"call_started", "dtmf", "call_ended"})
    await inbound.unsubscribe()
    for activity in activities.values():
        assert activity.conversation.id == started.conversation and activity.tenant == TENANT
        assert activity.detail["stream"] == started.stream and activity.detail["call_id"] == "call-keys"
    assert activities["dtmf"].detail["digits"] == "5"
    assert activities["call_ended"].detail["reason"] == protocol.stop_reason


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_audio_service_hangs_up_with_the_providers_own_message(
        nats_server: EmbeddedServer, start_hub: StartHub, protocol: type[BinaryCall]) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-bye") as (
            call, started), service.events(started.stream) as events:
        await service.hangup(started.stream, "goodbye")
        assert call.is_hangup(await call.next(), "goodbye")
        assert (await next_event(events, Stopped)).reason == "goodbye"
        assert await call.closed() == 1000


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_dtmf_to_the_call_is_played_where_the_protocol_can_and_a_dead_letter_where_it_cannot(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub, protocol: type[BinaryCall]) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    inbound = await conversations(nats_client, hub)
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-tones") as (
            call, started):
        await service.dtmf(started.stream, "12#")
        await service.mark(started.stream, "after-tones")  # the call goes on either way
        if protocol is GenesysCall:
            async with service.events(started.stream) as events:
                await played_event(events, call, "after-tones")
            messages = await call.sync()
        else:
            messages = []
            while not call.is_mark(message := await call.next(), "after-tones"):
                messages.append(message)
        played = [digits for message in messages if (digits := call.dtmf_played(message))]
        assert not call.socket.closed
    if hub.ctx.connections[protocol.connection].channel == "client_media":
        assert played == ["12#"]
        dtmf = (await activities_of(inbound, {"dtmf"}))["dtmf"]
        assert (dtmf.direction, dtmf.detail["digits"]) == ("outbound", "12#")
    else:
        assert played == []
        (letter,) = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                                       hub.subjects.stream_name("dead_letters")))
        assert "cannot play DTMF" in letter["error"]
    await inbound.unsubscribe()


# ---------------------------------------------------------------------------------- marks and clear


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_mark_is_acknowledged_by_the_provider_after_the_audio_before_it(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub, protocol: type[BinaryCall]) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    inbound = await conversations(nats_client, hub)
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-mark") as (
            call, started), service.events(started.stream) as events:
        answer = await play(service, started.stream, protocol, 20)
        await service.mark(started.stream, "answer-1")
        assert b"".join(await call.played(len(answer))) == answer
        if protocol is not GenesysCall:  # AudioHook has no mark message: the hub keeps the mark itself
            assert call.is_mark(await call.next(), "answer-1")  # right after the audio before it
        await call.acknowledge("answer-1")
        played = await played_event(events, call, "answer-1")
    assert played == Played(stream=started.stream, name="answer-1", acknowledged=True)
    mark = (await activities_of(inbound, {"mark"}))["mark"]
    await inbound.unsubscribe()
    assert (mark.conversation.id, mark.detail["stream"], mark.detail["name"]) == (
        started.conversation, started.stream, "answer-1")
    assert (mark.detail["acknowledged"], mark.detail["heard"]) == (True, True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_clear_drops_the_queued_answer_and_tells_the_provider(
        nats_server: EmbeddedServer, start_hub: StartHub, protocol: type[BinaryCall]) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-clear") as (
            call, started), service.events(started.stream) as events:
        answer = await play(service, started.stream, protocol, 250)  # five seconds, queued at once
        await call.played(2 * protocol.packet_bytes)  # the answer is playing
        await service.clear(started.stream)
        await service.mark(started.stream, "after-clear")
        before_clear = 2 * protocol.packet_bytes
        while not call.is_clear(message := await call.next()):
            before_clear += len(call.audio_of(message)) if isinstance(message, bytes) else 0
        if protocol is GenesysCall:
            played = await played_event(events, call, "after-clear")
            assert played.acknowledged  # by the session: nothing was left to play
            after_clear = [message for message in await call.sync() if isinstance(message, bytes)]
        else:
            after_clear = []
            while not call.is_mark(message := await call.next(), "after-clear"):
                after_clear.append(message)
        assert after_clear == []  # nothing of the cleared answer follows the clear
        assert before_clear < len(answer)


# ----------------------------------------------------------------- Asterisk's flow control (XOFF/XON)


@pytest.mark.parametrize("fmt", ["json", "txt"])
async def test_asterisk_media_xoff_holds_the_outbound_audio_until_media_xon(
        nats_server: EmbeddedServer, start_hub: StartHub, fmt: str) -> None:
    """While Asterisk says MEDIA_XOFF (its queue is nearly full, what comes is dropped) the hub sends no
    audio: it keeps it in its own bounded queue (the oldest dropped and counted), and plays what is
    left, in order, once Asterisk says MEDIA_XON."""
    hub = await start_hub(binary_config(nats_server.url, media_queue_seconds=0.2))  # 10 packets
    async with audio_service(nats_server, hub) as service, started_call(hub, service, AsteriskCall, "call-xoff") as (
            call, started), service.events(started.stream) as events:
        await call.socket.send_str(fixture_text("asterisk_media", f"media_xoff.{fmt}"))
        await call.dtmf("1")  # read after the XOFF: once it is an event, the hub holds the audio
        await next_event(events, DtmfPressed)
        answer = await play(service, started.stream, AsteriskCall, 30)
        await service.mark(started.stream, "end-of-answer")
        assert await dropped_down(hub, 20)  # the hub took all 30, and kept the newest 10
        assert await call.sync() == []  # nothing went to Asterisk while it said XOFF
        await call.socket.send_str(fixture_text("asterisk_media", f"media_xon.{fmt}"))
        resumed = await call.played(10 * 160)
        assert resumed == [answer[n * 160:(n + 1) * 160] for n in range(20, 30)]  # the newest ten, in order
        assert call.is_mark(await call.next(), "end-of-answer")


async def dropped_down(hub: Hub, count: int) -> bool:
    """Whether the hub's count of outbound frames dropped reaches `count` (polled, bounded)."""
    for _ in range(int(WAIT / 0.02)):
        if await metric(hub, "babelhub_audio_frames_dropped_total", "down") == count:
            return True
        await asyncio.sleep(0.02)
    return False


# ----------------------------------------------------------------------- AudioHook Monitor: listen-only


async def test_a_genesys_monitor_session_is_sent_nothing_its_marks_resolve_unheard_and_the_call_goes_on(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    inbound = await conversations(nats_client, hub)
    async with audio_service(nats_server, hub) as service, service.calls() as calls, \
            provider_call(hub, GenesysCall, "call-monitor") as call:
        opened = await call.begin("open_monitor_stereo.json")
        offered = fixture("genesys_media", "open_monitor_stereo.json")["parameters"]["media"]
        assert opened["parameters"]["media"] == offered[:1]  # external + internal
        started = await asyncio.wait_for(anext(aiter(calls)), WAIT)
        assert (started.inbound.codec, started.inbound.rate, started.inbound.channels) == ("mulaw", 8000, 2)
        async with service.events(started.stream) as events, service.listen(started.stream) as up:
            stereo = [bytes([n, n + 100]) * 160 for n in range(1, 6)]  # 20 ms, interleaved external/internal
            for payload in stereo:
                await call.socket.send_bytes(payload)
            frames = await take(up, 5)
            assert [f.payload for f in frames] == stereo and {f.channels for f in frames} == {2}
            await play(service, started.stream, GenesysCall, 20)  # an answer nobody would hear
            await service.mark(started.stream, "answer-1")
            played = await played_event(events, call, "answer-1")
            assert played == Played(stream=started.stream, name="answer-1", acknowledged=False, heard=False)
            await service.clear(started.stream)
            await call.socket.send_bytes(stereo[0])  # the call goes on
            assert [f.payload for f in await take(up, 1)] == [stereo[0]]
            assert [m for m in await call.sync() if isinstance(m, bytes) or json.loads(m)["type"] == "event"] == []
            await call.stop()
            stopped = await next_event(events, Stopped)
        assert stopped.dropped["unplayed"] == 20 and stopped.relayed["down"] == 0
    activities = await activities_of(inbound, {"mark"})
    await inbound.unsubscribe()
    assert (activities["mark"].detail["acknowledged"], activities["mark"].detail["heard"]) == (False, False)


# ------------------------------------------------------------------------------------ hostile input


@pytest.mark.parametrize(("change", "refused"), [
    pytest.param({"signature": "sig1=:" + base64.b64encode(bytes(32)).decode() + ":"}, True, id="forged"),
    pytest.param({"signature": None, "signature-input": None}, True, id="missing"),
    pytest.param({"created": int(time.time()) - 600}, True, id="stale"),
    pytest.param({"secret": base64.b64encode(b"not the client secret").decode()}, True, id="other-secret"),
    pytest.param({"x-api-key": "bm90IHRoZSBrZXk="}, True, id="other-api-key"),
    pytest.param({}, False, id="signed-now"),
])
async def test_a_genesys_opening_request_without_a_valid_fresh_signature_is_refused_with_403(
        nats_server: EmbeddedServer, start_hub: StartHub, change: dict[str, Any], refused: bool) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    signing = {name: change.pop(name) for name in ("created", "secret") if name in change}
    headers = signed_headers(genesys_session("call-forged"), **signing)
    headers.update({name: value for name, value in change.items() if value is not None})
    for name in [name for name, value in change.items() if value is None]:
        del headers[name]
    async with aiohttp.ClientSession() as session:
        if not refused:
            socket = await session.ws_connect(f"{hub.http_url}/media/gn", headers=headers)
            await socket.close()
            return
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await session.ws_connect(f"{hub.http_url}/media/gn", headers=headers)
        assert refusal.value.status == 403


async def test_asterisk_without_its_basic_credentials_is_refused_with_403(nats_server: EmbeddedServer,
                                                                         start_hub: StartHub) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": basic(ASTERISK_USER, "guessed")}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                await session.ws_connect(f"{hub.http_url}/media/ast", headers=headers)
            assert refusal.value.status == 403


UNREADABLE = [
    # Asterisk: a DTMF key that is none
    pytest.param(AsteriskCall, lambda call: call.event("dtmf_end.json", digit="%"), "$.digit", id="asterisk"),
    pytest.param(AsteriskTextCall, lambda call: call.line("dtmf_end.txt", digit="%"), "DTMF_END.digit",
                 id="asterisk-text"),
    # Genesys: a message that skips a seq
    pytest.param(GenesysCall, lambda call: json.dumps(fixture("genesys_media", "ping.json") | {
        "id": call.session, "seq": 7, "serverseq": 1}), "$.seq", id="genesys"),
    # client_media: audio in another format than its start declared
    pytest.param(ClientCall, lambda call: AudioFrame(stream=call.call_id, seq=0, timestamp=0, codec="mulaw",
                                                      rate=8000, payload=bytes(160)).to_bytes(), "codec",
                 id="client_media"),
]


@pytest.mark.parametrize(("protocol", "frame", "path"), UNREADABLE)
async def test_an_unreadable_frame_closes_with_1007_and_is_kept_as_a_dead_letter(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub, protocol: type[BinaryCall],
        frame: Any, path: str) -> None:
    hub = await start_hub(binary_config(nats_server.url))
    async with audio_service(nats_server, hub) as service, started_call(hub, service, protocol, "call-bad") as (
            call, started), service.events(started.stream) as events:
        bad = frame(call)
        await (call.socket.send_bytes(bad) if isinstance(bad, bytes) else call.socket.send_str(bad))
        assert await call.closed() == 1007
        await next_event(events, Stopped)  # the call's stream ended with its socket
    letters = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.media",
                                                 hub.subjects.stream_name("dead_letters")))
    (letter,) = letters
    assert letter["path"] == path and letter["connection"] == protocol.connection
    assert letter["body"] == (bad if isinstance(bad, bytes) else bad.encode())
    secrets = [ASTERISK_PASSWORD, *genesys_secrets().values()]
    assert not any(secret.encode() in msgspec.msgpack.encode(letter) for secret in secrets)
