"""Realtime audio through the hub, with its baselines measured in the same run.

N concurrent streams, each sending 50 frames a second of 20 ms audio, go

    client → hub (`WebSocket /media/{connection}`) → NATS `…audio.<stream>.up` → an echo audio service
    (one wildcard subscription republishing each frame) → NATS `…audio.<stream>.down` → hub (converted,
    cut, paced) → client

in two formats: 160-byte µ-law at 8 kHz (a Twilio Media Streams call: base64 JSON frames) and 640-byte
pcm16 at 16 kHz (a Vonage Voice WebSocket call: binary L16 frames). The first bytes of each payload
carry the frame's number, so the client matches what comes back with what it sent and times it. For
each N it prints the added latency (p50, p99, p99.9), loss, reordering, the largest gap between two
frames played out to the client, and the hub's CPU and RSS per stream; then the time from an audio
service's `clear` to the provider being told to drop what it buffered (clear-to-silence). Baselines,
same run, same N and rate: a bare NATS request/reply round trip, a direct WebSocket echo with no NATS,
and an in-process queue relay.

    python bench/audio_latency.py [--streams 1,100,500,1000] [--seconds 5]

Every part is a separate process on 127.0.0.1 (nats-server, the hub, the echo service, the WebSocket
echo server); this process is the clients. N stops growing once a path loses frames or its p99 passes
200 ms (the machine no longer holds it). Targets (issue 10): at 100 streams the hub's p99 ≤ the bare
NATS round trip's p99 + 1 ms; the largest N with zero loss and p99 ≤ 20 ms; clear-to-silence ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats
import uvloop
from aiohttp import WSMsgType, web
from e2e_bench import CpuMeter, percentile, process, wait_http
from nats.aio.msg import Msg

from babelhub.audio import AudioFrame, AudioService
from babelhub.services.broker import EmbeddedServer, free_port

TENANT = "bench"
PREFIX = "audio"
AUTH_TOKEN = "bench-twilio-auth-token"
FRAME_SECONDS = 0.020
GIVE_UP_P99_MS = 200.0
_NUMBER = struct.Struct(">IQ")  # frame number, stream number: the first 12 bytes of every payload
WARM_UP = 2**32 - 1
"""The frame number of the frames sent until a stream's echo comes back (the service is listening)."""


class Last(dict[int, tuple[int, float]]):
    """Per stream, the number and arrival time of the last frame that came back."""


@dataclass
class Format:
    name: str
    connection: str
    payload_bytes: int


MULAW = Format("µ-law 8 kHz, 160 B", "tw", 160)
PCM16 = Format("pcm16 16 kHz, 640 B", "vg", 640)


@dataclass
class Tally:
    """What the clients of one run measured."""

    sent: dict[tuple[int, int], float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    reordered: int = 0
    largest_gap: float = 0.0
    received: int = 0

    def arrived(self, stream: int, number: int, now: float, last: Last) -> None:
        sent = self.sent.pop((stream, number), None)
        if sent is None:
            return  # a duplicate, or sent before this run
        self.received += 1
        self.latencies.append((now - sent) * 1000)
        previous = last.get(stream)
        if previous is not None:
            if number < previous[0]:
                self.reordered += 1
            self.largest_gap = max(self.largest_gap, (now - previous[1]) * 1000)
        last[stream] = (number, now)

    def line(self, label: str, expected: int) -> str:
        lost = expected - self.received
        ordered = sorted(self.latencies)
        if not ordered:
            return f"    {label:<34} no frame came back (lost {lost} of {expected})"
        return (f"    {label:<34} p50 {percentile(ordered, 0.5):6.2f}  p99 {percentile(ordered, 0.99):7.2f}  "
                f"p99.9 {percentile(ordered, 0.999):7.2f} ms   lost {lost}/{expected}  reordered {self.reordered}"
                + (f"  largest gap {self.largest_gap:.1f} ms" if self.largest_gap else ""))

    def p99(self) -> float:
        return percentile(sorted(self.latencies), 0.99) if self.latencies else float("inf")


def payload(stream: int, number: int, size: int) -> bytes:
    """A frame's audio: its numbers, then µ-law/pcm16 silence-ish filler."""
    return _NUMBER.pack(number, stream) + b"\x7f" * (size - _NUMBER.size)


def numbers(data: bytes) -> tuple[int, int]:
    number, stream = _NUMBER.unpack_from(data)
    return stream, number


async def paced(seconds: float, streams: int, send: Callable[[int, int], Awaitable[None]]) -> int:
    """Send frame after frame for every stream every 20 ms (open loop, spread over the interval); the
    number of frames sent per stream."""
    frames = int(seconds / FRAME_SECONDS)
    started = time.perf_counter()
    for number in range(frames):
        for stream in range(streams):
            due = started + number * FRAME_SECONDS + stream * FRAME_SECONDS / streams
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(stream, number)
    return frames


# ----------------------------------------------------------------------------------- baselines


async def nats_round_trip(url: str, streams: int, seconds: float, size: int) -> tuple[Tally, int]:
    """Each frame a core-NATS request to an echo responder in this process's other connection."""
    tally, last = Tally(), Last()
    responder, client = await nats.connect(url), await nats.connect(url)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await responder.subscribe("bench.echo", cb=echo)
    await responder.flush()
    for _ in range(100):  # until the subscription is known where the client asks
        try:
            await client.request("bench.echo", b"", timeout=0.5)
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.05)

    async def request(stream: int, number: int) -> None:
        tally.sent[(stream, number)] = time.perf_counter()
        answer = await client.request("bench.echo", payload(stream, number, size), timeout=5.0)
        tally.arrived(*numbers(answer.data), time.perf_counter(), last)

    tasks: set[asyncio.Task[None]] = set()

    async def send(stream: int, number: int) -> None:
        task = asyncio.create_task(request(stream, number))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    frames = await paced(seconds, streams, send)
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    await responder.close()
    tally.largest_gap = 0.0  # request/reply has no playout
    return tally, frames * streams


async def websocket_echo(url: str, streams: int, seconds: float, size: int) -> tuple[Tally, int]:
    """Each stream a WebSocket to an echo server in another process: the transport with nothing behind it."""
    tally, last = Tally(), Last()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = [await session.ws_connect(url) for _ in range(streams)]
        readers = [asyncio.create_task(_read_binary(socket, tally, last)) for socket in sockets]

        async def send(stream: int, number: int) -> None:
            tally.sent[(stream, number)] = time.perf_counter()
            await sockets[stream].send_bytes(payload(stream, number, size))

        frames = await paced(seconds, streams, send)
        await asyncio.sleep(0.5)
        for socket in sockets:
            await socket.close()
        await asyncio.gather(*readers, return_exceptions=True)
    tally.largest_gap = 0.0
    return tally, frames * streams


async def _read_binary(socket: aiohttp.ClientWebSocketResponse, tally: Tally,
                       last: Last) -> None:
    async for message in socket:
        if message.type == WSMsgType.BINARY:
            tally.arrived(*numbers(message.data), time.perf_counter(), last)


async def queue_relay(streams: int, seconds: float, size: int) -> tuple[Tally, int]:
    """Two asyncio queue hops in one process: the least a relay could cost."""
    tally, last = Tally(), Last()
    there: asyncio.Queue[bytes] = asyncio.Queue()
    back: asyncio.Queue[bytes] = asyncio.Queue()

    async def relay() -> None:
        while True:
            await back.put(await there.get())

    async def receive() -> None:
        while True:
            data = await back.get()
            tally.arrived(*numbers(data), time.perf_counter(), last)

    workers = [asyncio.create_task(relay()), asyncio.create_task(receive())]

    async def send(stream: int, number: int) -> None:
        tally.sent[(stream, number)] = time.perf_counter()
        await there.put(payload(stream, number, size))

    frames = await paced(seconds, streams, send)
    await asyncio.sleep(0.2)
    for worker in workers:
        worker.cancel()
    tally.largest_gap = 0.0
    return tally, frames * streams


# ------------------------------------------------------------------------------- through the hub


class Call:
    """One provider stream to the hub: Twilio Media Streams (µ-law) or Vonage's WebSocket (pcm16)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, audio: Format, stream: int) -> None:
        self.socket = socket
        self.audio = audio
        self.stream = stream
        self.sid = f"MZ{stream:030d}"
        self.cleared_at = 0.0
        self.after_clear = 0
        self.warm = asyncio.Event()

    async def begin(self) -> None:
        if self.audio is MULAW:
            await self.socket.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await self.socket.send_str(json.dumps({
                "event": "start", "sequenceNumber": "1", "streamSid": self.sid,
                "start": {"accountSid": "AC" + "0" * 32, "streamSid": self.sid, "callSid": f"CA{self.stream:032d}",
                          "tracks": ["inbound"], "customParameters": {"caller": f"+1555{self.stream:07d}"},
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        else:
            await self.socket.send_str(json.dumps({
                "event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                "uuid": f"vonage-{self.stream}", "from": f"1555{self.stream:07d}", "to": "15550000000"}))

    async def send(self, number: int) -> None:
        data = payload(self.stream, number, self.audio.payload_bytes)
        if self.audio is MULAW:
            await self.socket.send_str(json.dumps({
                "event": "media", "sequenceNumber": str(number + 2), "streamSid": self.sid,
                "media": {"track": "inbound", "chunk": str(number + 1), "timestamp": str(number * 20),
                          "payload": base64.b64encode(data).decode()}}))
        else:
            await self.socket.send_bytes(data)

    async def read(self, tally: Tally, last: Last) -> None:
        async for message in self.socket:
            now = time.perf_counter()
            if message.type == WSMsgType.BINARY:
                self._audio(message.data, now, tally, last)
            elif message.type == WSMsgType.TEXT:
                frame = json.loads(message.data)
                if frame.get("event") == "media":
                    self._audio(base64.b64decode(frame["media"]["payload"]), now, tally, last)
                elif frame.get("event") == "clear" or frame.get("action") == "clear":
                    self.cleared_at = time.time()

    def _audio(self, data: bytes, now: float, tally: Tally, last: Last) -> None:
        if self.cleared_at:
            self.after_clear += 1
        if len(data) < _NUMBER.size:
            return
        stream, number = numbers(data)
        if number == WARM_UP:
            self.warm.set()
        else:
            tally.arrived(stream, number, now, last)


async def warm_up(call: Call) -> None:
    """Send warm-up frames until one comes back: the echo service has heard of the stream and listens."""
    for _ in range(300):
        await call.send(WARM_UP)
        try:
            await asyncio.wait_for(call.warm.wait(), 0.1)
            return
        except TimeoutError:
            continue
    raise RuntimeError(f"stream {call.stream}: the echo service never answered")


def twilio_signature(url: str) -> str:
    return base64.b64encode(hmac.new(AUTH_TOKEN.encode(), url.encode(), hashlib.sha1).digest()).decode()


async def through_hub(http_url: str, audio: Format, streams: int, seconds: float) -> tuple[Tally, int]:
    tally, last = Tally(), Last()
    url = f"{http_url.replace('http', 'ws', 1)}/media/{audio.connection}"
    headers = {"X-Twilio-Signature": twilio_signature(url)} if audio is MULAW else {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        calls = [Call(await session.ws_connect(url, headers=headers, max_msg_size=0), audio, n) for n in range(streams)]
        for call in calls:
            await call.begin()
        readers = [asyncio.create_task(call.read(tally, last)) for call in calls]
        await asyncio.gather(*(warm_up(call) for call in calls))

        async def send(stream: int, number: int) -> None:
            tally.sent[(stream, number)] = time.perf_counter()
            await calls[stream].send(number)

        frames = await paced(seconds, streams, send)
        await asyncio.sleep(1.0)  # the last frames, paced out
        for call in calls:
            await call.socket.close()
        await asyncio.gather(*readers, return_exceptions=True)
    return tally, frames * streams


async def clear_to_silence(http_url: str, nats_url: str) -> tuple[float, int]:
    """An audio service plays 2 s of audio into a Twilio call at once, then clears it: the time from its
    `clear` to the hub telling the provider to drop its buffer, and the frames that still came after."""
    url = f"{http_url.replace('http', 'ws', 1)}/media/{MULAW.connection}"
    nc = await nats.connect(nats_url)
    service = AudioService(nc, PREFIX, TENANT)
    async with aiohttp.ClientSession() as session, service.calls() as calls:
        socket = await session.ws_connect(url, headers={"X-Twilio-Signature": twilio_signature(url)})
        call = Call(socket, MULAW, 999_999)
        await call.begin()
        started = await asyncio.wait_for(anext(aiter(calls)), 10)
        reader = asyncio.create_task(call.read(Tally(), Last()))
        for number in range(100):
            await service.play(started.stream, AudioFrame(
                stream=started.stream, seq=number, timestamp=number * 20_000, codec="mulaw", rate=8000,
                payload=payload(999_999, number, 160)))
        await asyncio.sleep(0.2)
        cleared = time.time()
        await service.clear(started.stream)
        await asyncio.sleep(0.5)
        await call.socket.close()
        await asyncio.gather(reader, return_exceptions=True)
    await nc.close()
    return (call.cleared_at - cleared) * 1000 if call.cleared_at else float("inf"), call.after_clear


# ------------------------------------------------------------------------------------- the parts


async def echo_service(nats_url: str) -> None:
    """Plays back to every stream what it hears, until killed: one wildcard subscription to every
    stream's `up`, each frame republished as it is on the stream's `down` (the least an audio service
    can cost, so that what is measured is the hub; `AudioService` works on the same subjects and bytes)."""
    nc = await nats.connect(nats_url)

    async def echo(msg: Msg) -> None:
        await nc.publish(msg.subject[:-len("up")] + "down", msg.data)

    await nc.subscribe(f"{PREFIX}.{TENANT}.audio.*.up", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def websocket_echo_server(port: int) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == WSMsgType.BINARY:
                await socket.send_bytes(message.data)
        return socket

    app = web.Application()
    app.router.add_get("/", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def hub_config(path: Path, nats_url: str, port: int) -> None:
    path.write_text(f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_url}"
subject_prefix = "{PREFIX}"
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "{MULAW.connection}"
tenant = "{TENANT}"
channel = "twilio_media"
secrets = {{ auth_token = "{AUTH_TOKEN}" }}
options = {{ public_url = "ws://127.0.0.1:{port}/media/{MULAW.connection}" }}
[[connections]]
id = "{PCM16.connection}"
tenant = "{TENANT}"
channel = "vonage_media"
""")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def bench(args: argparse.Namespace) -> None:
    sizes = [int(n) for n in args.streams.split(",")]
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; every process on 127.0.0.1; "
          f"{args.seconds:g} s per run, 50 frames/s per stream")
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(Path(data) / "nats", port=0)
        await server.start()
        port, ws_port = free_port(), free_port()
        config = Path(data) / "hub.toml"
        hub_config(config, server.url, port)
        try:
            with process("-m", "babelhub", "run", "--config", str(config), ready=False) as hub, \
                    process(str(Path(__file__).resolve()), "--role", "echo", "--nats", server.url), \
                    process(str(Path(__file__).resolve()), "--role", "ws-echo", "--port", str(ws_port)):
                await wait_http(f"http://127.0.0.1:{port}/readyz")
                await report(args, sizes, server.url, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{ws_port}/",
                             hub.pid)
        finally:
            await server.stop()


async def report(args: argparse.Namespace, sizes: list[int], nats_url: str, http_url: str, ws_url: str,
                 hub_pid: int) -> None:
    holding = {"hub": True, "nats": True, "ws": True, "queue": True}
    for streams in sizes:
        for audio in (MULAW, PCM16):
            print(f"\n{streams} stream(s), {audio.name}")
            if holding["queue"]:
                tally, expected = await queue_relay(streams, args.seconds, audio.payload_bytes)
                print(tally.line("in-process queue relay", expected))
                holding["queue"] = holds(tally, expected)
            if holding["nats"]:
                tally, expected = await nats_round_trip(nats_url, streams, args.seconds, audio.payload_bytes)
                print(tally.line("bare NATS request/reply", expected))
                holding["nats"] = holds(tally, expected)
            if holding["ws"]:
                tally, expected = await websocket_echo(ws_url, streams, args.seconds, audio.payload_bytes)
                print(tally.line("direct WebSocket echo (no NATS)", expected))
                holding["ws"] = holds(tally, expected)
            if holding["hub"]:
                meter = CpuMeter({"hub": hub_pid})
                idle_rss = rss_kib(hub_pid)
                meter.start()
                tally, expected = await through_hub(http_url, audio, streams, args.seconds)
                used, _busy = meter.stop()
                print(tally.line("through the hub", expected))
                print(f"    {'':<34} hub CPU {used['hub'] / args.seconds / streams * 100:.2f}% of a core per stream, "
                      f"RSS {max(0, rss_kib(hub_pid) - idle_rss) / streams:.1f} KiB per stream (grown during the run)")
                holding["hub"] = holds(tally, expected)
            if not any(holding.values()):
                break
    ms, late = await clear_to_silence(http_url, nats_url)
    print(f"\nclear-to-silence: {ms:.1f} ms from the audio service's clear to the provider's clear message; "
          f"{late} frames of the cleared audio arrived after it   (target ≤ 20 ms)")


def holds(tally: Tally, expected: int) -> bool:
    return tally.received == expected and tally.p99() <= GIVE_UP_P99_MS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,100,500,1000", help="concurrent streams, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run")
    parser.add_argument("--role", choices=["bench", "echo", "ws-echo"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--nats", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "echo":
        uvloop.run(echo_service(args.nats))
    elif args.role == "ws-echo":
        uvloop.run(websocket_echo_server(args.port))
    else:
        uvloop.run(bench(args))


if __name__ == "__main__":
    main()
